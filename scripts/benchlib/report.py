"""The human-readable side of a report: number formatting, bench.md (the ratio table, then one paragraph or table
per part that ran), and json_safe for bench.json."""
from __future__ import annotations

import math


def fmt(x) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        if x == 0 or math.isnan(x):
            return f"{x:g}"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown(report: dict) -> str:
    """The ratio table (failed parts as one row each), then the details of every part that succeeded."""
    meta = report["meta"]
    lines = [f"# swarm_peer benchmarks ({'tiny' if meta['tiny'] else 'full'})", "",
             f"{meta['started']}, {meta['cpus']} CPUs, load average {meta['loadavg_start']} at start, "
             f"{meta['loadavg_end']} at the end; config `{meta['config']}` {' '.join(meta['overrides']) or ''}; "
             f"{meta['seconds']:.0f} s. Every figure is a ratio of two measurements of this invocation; on a shared "
             f"machine they are indicative.", "",
             "| ratio | value | definition |", "|---|---:|---|"]
    for part, res in report["parts"].items():
        if "error" in res:
            lines.append(f"| {part} | **failed** | {res['error'].splitlines()[0][:200]} |")
            continue
        for name, value in res["ratios"].items():
            lines.append(f"| {name} | {fmt(value)} | {res['definitions'].get(name, '')} |")
    for part, details in DETAILS.items():
        res = report["parts"].get(part, {})
        if "ratios" in res:
            lines += details(res)
    return "\n".join(lines) + "\n"


def _table(caption: str, header: str, rule: str, rows: list[str]) -> list[str]:
    return ["", caption, "", header, rule, *rows]


def _details_a(res: dict) -> list[str]:
    f = res["figures"]
    sw, b, b1 = f["swarm_steady"], f["baseline_steady"], f["baseline_1_thread_steady"]
    return ["", f"**a.** steady tokens/s: swarm {fmt(sw['tokens_per_s'])} on {fmt(sw['cores'])} cores, baseline "
            f"{fmt(b['tokens_per_s'])} on {fmt(b['cores'])} cores (1 thread: {fmt(b1['tokens_per_s'])} on "
            f"{fmt(b1['cores'])}); tokens per CPU second: swarm {fmt(sw['tokens_per_cpu_s'])}, baseline "
            f"{fmt(b['tokens_per_cpu_s'])} (1 thread: {fmt(b1['tokens_per_cpu_s'])}); end to end "
            f"{fmt(f['swarm_end_to_end_tokens_per_s'])} vs {fmt(f['baseline_end_to_end_tokens_per_s'])}."]


def _details_b(res: dict) -> list[str]:
    rows = [f"| {r['case']} | {r['shape']} | {r['codec']} | {fmt(r['tensors_per_s'])} | {fmt(r['p50_ms'])} "
            f"| {fmt(r['wire_mib_per_s']) if 'wire_mib_per_s' in r else '-'} | {fmt(r['ratio_to_tcp'])} |"
            for r in res["rows"]]
    return _table("**b.** one hop = one tensor there and a same-shaped one back:",
                  "| case | shape | codec | hops/s | p50 ms | wire MiB/s | vs raw TCP |",
                  "|---|---|---|---:|---:|---:|---:|", rows)


def _details_c(res: dict) -> list[str]:
    rows = [f"| {s} | {st['mode']} | {st['codec']} | {st['params']:,} | {st['rounds']} | "
            f"{fmt(st['inner_steps_per_round'])} | {fmt(st['bytes_sent_per_round'] / 2**20)} |"
            for s, st in res["figures"]["stages"].items()]
    return _table("**c.** one 4-stage x 2-peer run, one sync setting per stage:",
                  "| stage | mode | averaging | params | 2-peer rounds | inner steps/peer/round | "
                  "MiB sent/peer/round |",
                  "|---:|---|---|---:|---:|---:|---:|", rows)


def _details_d(res: dict) -> list[str]:
    f = res["figures"]
    return ["", f"**d.** join download {fmt(f['join_seconds'])} s for {fmt(f['state_bytes'] / 2**20)} MiB from "
            f"{f['donors']} donor(s); loopback {fmt(f['loopback_bytes_per_s'] / 2**20)} MiB/s -> ideal "
            f"{fmt(f['ideal_seconds'] * 1e3)} ms; process start to serving "
            f"{fmt(f['process_start_to_serving_s'])} s."]


def _details_e(res: dict) -> list[str]:
    f = res["figures"]
    return ["", f"**e.** stage-0 step interval {fmt(f['step_interval_s'])} s; longest gap without a step: "
            f"{fmt(f['stall_s'])} s after the kill, {fmt(f['pre_kill_longest_gap_s'])} s in the steady window "
            f"before; recovery {fmt(f['recovery_s'])} s{' (not reached)' if f['recovery_censored'] else ''} "
            f"(rolling window {fmt(f['rolling_window_s'])} s); tokens/s before {fmt(f['pre_kill_tokens_per_s'])},"
            f" in the 2nd half of the {fmt(f['observe_s'])} s after {fmt(f['post_kill_tokens_per_s'])} "
            f"({fmt(f['post_over_pre'])} x)."]


def _details_f(res: dict) -> list[str]:
    def mib(row: dict, key: str) -> str:
        return fmt(row[key] / 2**20)

    rows = [f"| {r['run']} | {r['peer']} | {r['mode']} | {mib(r, 'peak_rss_bytes')} | {mib(r, 'state_bytes')} | "
            f"{mib(r, 'params_bytes')} | {mib(r, 'grads_bytes')} | {mib(r, 'inner_optimizer_bytes')} | "
            f"{mib(r, 'outer_state_bytes')} | {mib(r, 'averaging_buffers_bytes')} | "
            f"{mib(r, 'inflight_activation_bytes')} | {fmt(r['ratio'])} |" for r in res["rows"]]
    return _table("**f.** memory per peer:",
                  "| run | peer | mode | peak RSS MiB | state MiB | params | grads | inner opt | outer | avg buffers | "
                  "activations | RSS/state |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", rows)


DETAILS = {"a": _details_a, "b": _details_b, "c": _details_c, "d": _details_d, "e": _details_e,
           "f": _details_f}  # in the order of the parts


def json_safe(x):
    """A copy that json.dumps accepts and writes as standard JSON: str keys, NaN/inf as null."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
