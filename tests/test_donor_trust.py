"""donor_trust.DonorTrust: whose state claims a peer believes (injected clock)."""
from swarm_peer.donor_trust import DECLINES_TO_DISTRUST, UNBACKED_CLAIM_S, DonorTrust


def test_an_unbacked_claim_is_ignored_for_a_while_then_believed_again():
    now = [0.0]
    trust = DonorTrust(announce_period=2.0, clock=lambda: now[0])
    assert trust.trusts("a")
    trust.distrust("a", "runs no averager")
    assert not trust.trusts("a") and trust.trusts("b")
    now[0] = UNBACKED_CLAIM_S + 0.1
    assert trust.trusts("a")


def test_declines_distrust_only_when_repeated_over_two_announce_periods():
    now = [0.0]
    trust = DonorTrust(announce_period=2.0, clock=lambda: now[0])
    for _ in range(DECLINES_TO_DISTRUST + 2):  # quick refusals within one announce period: a lagging record
        trust.count_declines(["a"], declined=["a"])
        now[0] += 0.1
    assert trust.trusts("a")
    now[0] = 4.5
    trust.count_declines(["a"], declined=["a"])  # still refusing after 2 periods: not believed
    assert not trust.trusts("a") and "a" not in trust.declines


def test_a_donor_that_serves_once_starts_its_count_again():
    now = [0.0]
    trust = DonorTrust(announce_period=1.0, clock=lambda: now[0])
    for _ in range(DECLINES_TO_DISTRUST - 1):
        trust.count_declines(["a", "b"], declined=["a", "b"])
    trust.count_declines(["a", "b"], declined=["b"])  # a served
    now[0] = 10.0
    trust.count_declines(["a", "b"], declined=["a", "b"])
    assert trust.trusts("a") and not trust.trusts("b")
