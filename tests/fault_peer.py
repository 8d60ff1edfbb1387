"""Test-only faults: run `python -m swarm_peer ...` with faults injected from the environment (never in the user CLI).

Usage (the harness's `prefix`): python tests/fault_peer.py <python> -m swarm_peer <args...>, with
  SWARM_TEST_CLOCK_OFFSET=S   this machine's wall clock is off by S seconds (time.time shifted before anything reads
                              it: hivemind's DHT time, its DHT and averager processes forked from this one, records)
  SWARM_TEST_FAULTS=a,b,...   refuse_state      never serve the stage state (a donor that is unreachable)
                              perturb_round=R   after completing round R, this peer's global weights are nudged
                                                (a replica that went wrong: it must recover or go on, not stall)
                              fail_after_allreduce=R[+R...]  this peer's side of round R's all-reduce fails after
                                                the groupmates have completed it (a reply lost at the very end);
                                                R = "end": every round at the run's end (clock >= --max-steps - 1)
                              fail_once_from=R  the same, once: the first all-reduce this peer reaches in a round >= R
                              guard_averager    report any use of the averager's tensors (its lock) on the compute
                                                thread: a line "AVERAGER LOCK ON THE COMPUTE THREAD" in the log
                              slow=S            every forward takes S s longer (a slower machine; its measured
                                                throughput, which routing reads, includes the delay)
                              blind_round=R[+R...]  every DHT read of stage records fails (returns nothing, as
                                                a timed-out get does) while this peer runs its round R
                              hold_until=PATH   a stage-0 peer starts training only once PATH exists (peers
                                                started together begin together, however long each took to start)
                              crash_in_round    kill -9 of the whole peer (its process group) while its averager
                                                reduces its first all-reduce, between a part's sum and its reply
"""
import os
import runpy
import sys
import threading
import time

offset = float(os.environ.get("SWARM_TEST_CLOCK_OFFSET", "0"))
if offset:
    _real = time.time
    time.time = lambda: _real() + offset
faults = dict(f.partition("=")[::2] for f in os.environ.get("SWARM_TEST_FAULTS", "").split(",") if f)

if "hold_until" in faults:
    import asyncio

    from swarm_peer.driver import Driver

    _drive, _hold = Driver.drive, faults["hold_until"]

    async def _drive_when_released(self, max_steps):
        deadline = time.monotonic() + 300
        while not os.path.exists(_hold) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return await _drive(self, max_steps)

    Driver.drive = _drive_when_released

if "refuse_state" in faults:
    from swarm_peer.sync import StageSync

    StageSync._state_for_download = lambda self: ({"round": -1}, [])

if "perturb_round" in faults:
    import torch

    from swarm_peer.sync import StageSync

    _advance = StageSync._advance
    target = int(faults["perturb_round"])

    def _advance_perturbed(self, next_round, carried=(0, 0)):
        if next_round == target + 1 and self.outer is not None:
            with torch.no_grad():
                self.outer.global_params[0].add_(1e-3)  # the global copy of the first parameter
        _advance(self, next_round, carried)

    StageSync._advance = _advance_perturbed

if "fail_after_allreduce" in faults or "fail_once_from" in faults:
    from hivemind.averaging.partition import AllreduceException

    from swarm_peer.averaging import StageAverager

    _run = StageAverager._run_allreduce_inplace_
    failing = faults.get("fail_after_allreduce", "").split("+")
    rounds = {int(r) for r in failing if r not in ("end", "")}
    end = float(sys.argv[sys.argv.index("--max-steps") + 1]) if "end" in failing else None
    once_from = [int(faults["fail_once_from"])] if "fail_once_from" in faults else []  # the averager process's

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        await _run(self, tensors, group_info, group_id, **kwargs)  # the groupmates get everything and complete
        mine = self._my_gathered(group_info)
        once = bool(once_from) and mine.get("round", -1) >= once_from[0]
        if once:
            once_from.clear()
        if once or mine.get("round") in rounds or (end is not None and mine.get("clock", 0) >= end - 1):
            raise AllreduceException("test fault: this side failed after the all-reduce")

    StageAverager._run_allreduce_inplace_ = _run_allreduce_inplace_

if "guard_averager" in faults:
    from swarm_peer.averaging import StageAverager

    _get = StageAverager.get_tensors

    def get_tensors(self):
        if threading.current_thread().name == "swarm-peer-compute":
            print("AVERAGER LOCK ON THE COMPUTE THREAD", file=sys.stderr, flush=True)
        return _get(self)

    StageAverager.get_tensors = get_tensors

if "blind_round" in faults:
    from swarm_peer import stage_worker
    from swarm_peer.sync import StageSync

    blind, blind_rounds = threading.Event(), {int(r) for r in faults["blind_round"].split("+")}
    _read_records, _average = stage_worker.read_stage_records, StageSync._average

    def read_blindly(*args, **kwargs):
        return [] if blind.is_set() else _read_records(*args, **kwargs)

    async def average_blind(self, r, *args, **kwargs):
        if r in blind_rounds:
            blind.set()
        try:
            return await _average(self, r, *args, **kwargs)
        finally:
            blind.clear()

    stage_worker.read_stage_records, StageSync._average = read_blindly, average_blind

if "slow" in faults:
    from swarm_peer.compute import StageTrainer

    delay, _forward, _account = float(faults["slow"]), StageTrainer.forward, StageTrainer._account

    def forward(self, x):
        time.sleep(delay)
        self._fault_delay = delay  # counted by the _account call that ends this forward
        return _forward(self, x)

    def account(self, samples, seconds):
        extra, self._fault_delay = getattr(self, "_fault_delay", 0.0), 0.0
        _account(self, samples, seconds + extra)

    StageTrainer.forward, StageTrainer._account = forward, account

if "crash_in_round" in faults:
    import signal

    from swarm_peer.allreduce import ValueAllReduceRunner

    _result = ValueAllReduceRunner._result

    def result_then_die(self, part_index, averaged):  # the averager process: forked after this patch
        os.killpg(os.getpgid(0), signal.SIGKILL)
        return _result(self, part_index, averaged)

    ValueAllReduceRunner._result = result_then_die

assert sys.argv[2:4] == ["-m", "swarm_peer"], sys.argv
sys.argv = ["swarm_peer", *sys.argv[4:]]
runpy.run_module("swarm_peer", run_name="__main__", alter_sys=True)
