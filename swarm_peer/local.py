"""`./run_local_experiment.sh` (this module behind it): a whole swarm on this machine, S stages × P peers on loopback
plus a monitor peer, one merged console, every process's log and summary under runs/<id>/.

    ./run_local_experiment.sh [-s STAGES] [-p PEERS_PER_STAGE] [-c CONFIG] [--run-id ID] [--max-steps N]
                              [--timeout SECONDS] [--wandb-project P] [--no-monitor] [--private] [--checkpoints]
                              [-- extra args for every peer]
    ./run_local_experiment.sh stop [RUN_ID]          # stop a running experiment (default: the latest)

The monitor starts first (the swarm's bootstrap) and logs the global loss to W&B (offline without an API key, files
under runs/<id>/wandb). --private: a new swarm key in runs/<id>/swarm.key for every process. Env defaults: N_STAGES,
PEERS_PER_STAGE, CONFIG, WANDB_PROJECT. Ctrl-C (or `stop`, or --timeout) asks every peer to finish: each writes its
summary and final weights (and checkpoint, with --checkpoints), then the monitor closes its W&B run. Exits non-zero if any peer
failed, 130 when stopped.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from swarm_peer.launch import PYTHON, ROOT, LaunchError, Launcher, monitor_args, peer_args
from swarm_peer.progress import count, duration

PROG = "run_local_experiment"
READY_S = 60.0  # per process, from start to its maddrs file
PEERS_GRACE_S = 60.0  # a stopped peer: its last round's end, checkpoint, summary, DHT shutdown
MONITOR_GRACE_S = 20.0
LOSS_TAIL = 10  # the end-of-run table's training loss: the mean over each replica's last steps  # the monitor: its last windows, then the W&B run's flush


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (not argparse's usage block)
        print(f"{PROG}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _die(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(argv: list[str]) -> argparse.Namespace:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = _Parser(prog="./run_local_experiment.sh", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("-s", "--stages", type=int, default=int(os.environ.get("N_STAGES", 2)))
    p.add_argument("-p", "--peers-per-stage", type=int, default=int(os.environ.get("PEERS_PER_STAGE", 2)))
    p.add_argument("-c", "--config", default=os.environ.get("CONFIG", "configs/tiny.yaml"))
    p.add_argument("--run-id", default=f"local-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--timeout", type=int, default=3600, help="seconds; then the run is stopped (and fails)")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", "swarm_peer"))
    p.add_argument("--no-monitor", action="store_true")
    p.add_argument("--private", action="store_true")
    p.add_argument("--checkpoints", action="store_true",
                   help="every peer checkpoints to runs/<id>/ckpt/<peer>/ (every run.checkpoint_interval s and on exit, "
                        "Ctrl-C included); a peer started again with that --checkpoint-dir resumes")
    args = p.parse_args(argv)
    args.extra = extra
    if args.stages < 2:
        _die("--stages must be at least 2 (use python -m swarm_peer.baseline for one process)")
    if args.peers_per_stage < 1:
        _die("--peers-per-stage must be a positive integer")
    if args.timeout < 0:
        _die("--timeout must be seconds")
    if not Path(args.config).is_file():
        _die(f"config {args.config} not found")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", args.run_id):
        _die("--run-id: use letters, digits and '-'")
    return args


class LocalRun:
    def __init__(self, args: argparse.Namespace):
        self.args, self.dir = args, Path("runs") / args.run_id
        self.launcher = Launcher(self.dir, echo=True)
        self.stop_asked = 0  # signals received (a second one kills at once)
        self.key = ["--swarm-key-file", str(self.dir / "swarm.key")] if args.private else []
        self.peer_extra = ["--set", f"swarm.num_stages={args.stages}", "--set", "run.threads=1", *self.key,
                           *(["--max-steps", str(args.max_steps)] if args.max_steps else []), *args.extra]
        # the monitor takes the config and the peers' --set overrides, not their other options
        sets = [a for i, a in enumerate(args.extra) if i and args.extra[i - 1] == "--set"]
        self.monitor_sets = [f"swarm.num_stages={args.stages}", *sets]

    def _start(self, name: str, argv: list[str], label: str) -> None:
        self.launcher.start(name, argv, label=label)
        with open(self.dir / "pids", "a") as f:
            f.write(f"{self.launcher.procs[name].pid} {name}\n")

    def _start_peer(self, stage: int, index: int, bootstrap: str | None) -> str:
        name = f"stage{stage}_peer{index}"
        shard = ["--data-shard", f"{index}/{self.args.peers_per_stage}"] if stage == 0 else []
        ckpt = ["--checkpoint-dir", str(self.dir / "ckpt" / name)] if self.args.checkpoints else []
        self._start(name, peer_args(stage, self.args.run_id, maddrs_file=self.dir / f"{name}.maddrs",
                                    config=self.args.config, initial_peers=bootstrap,
                                    summary_json=self.dir / f"{name}.json",
                                    extra=["--save-weights", str(self.dir / f"{name}.pt"), *shard, *ckpt,
                                           *self.peer_extra]),
                    label=f"stage{stage}/peer{index}")
        return name

    def start(self) -> None:
        a = self.args
        print(f"run {a.run_id}: {a.stages} stages x {a.peers_per_stage} peers, config {a.config}, logs in {self.dir}/",
              flush=True)
        if a.private:
            made = subprocess.run([PYTHON, "-m", "swarm_peer", "keygen", str(self.dir / "swarm.key")],
                                  capture_output=True, text=True)
            if made.returncode:
                raise LaunchError(f"could not write {self.dir / 'swarm.key'}: {made.stderr.strip()}")
        first = None
        if not a.no_monitor:  # the monitor bootstraps the DHT and logs the global loss to W&B
            self._start("monitor", monitor_args(a.run_id, config=a.config, overrides=self.monitor_sets,
                                                maddrs_file=self.dir / "monitor.maddrs",
                                                history_json=self.dir / "monitor.jsonl",
                                                extra=["--wandb-project", a.wandb_project, "--wandb-dir",
                                                       str(self.dir), *self.key]), label="monitor")
            bootstrap = self.launcher.wait_file("monitor", self.dir / "monitor.maddrs", READY_S)
        else:  # the last stage's first peer bootstraps the DHT
            first = self._start_peer(a.stages - 1, 0, None)
            bootstrap = self.launcher.wait_file(first, self.dir / f"{first}.maddrs", READY_S)
        (self.dir / "bootstrap.maddr").write_text(bootstrap + "\n")
        for stage in range(a.stages - 1, -1, -1):  # later stages first, so stage 0 finds a pipeline
            names = [self._start_peer(stage, p, bootstrap) for p in range(a.peers_per_stage)
                     if f"stage{stage}_peer{p}" != first]
            for name in names:
                if self.stop_asked:
                    return
                self.launcher.wait_file(name, self.dir / f"{name}.maddrs", READY_S)
        print(f"run {a.run_id}: all {a.stages * a.peers_per_stage} peers up", flush=True)

    def wait(self) -> int:
        """Until every process has exited by itself, --timeout, or a stop signal. Returns the exit code."""
        deadline, failed, reported = time.monotonic() + self.args.timeout, False, set()
        while self.launcher.running() and not self.stop_asked:
            if time.monotonic() > deadline:
                print(f"{PROG}: timeout after {self.args.timeout} s; stopping the run", flush=True)
                return max(self.shutdown(), 1)
            failed |= self._report_exits(reported)
            time.sleep(0.5)
        if self.stop_asked:
            return self.shutdown()
        failed |= self._report_exits(reported)
        return int(failed)

    def _report_exits(self, reported: set) -> bool:
        failed = False
        for name, proc in self.launcher.processes.items():
            rc = proc.popen.poll()
            if rc is not None and name not in reported:
                reported.add(name)
                if rc:
                    failed = True
                    print(f"{PROG}: {name} exited with {rc} (see {proc.log_path})", flush=True)
        return failed

    def shutdown(self) -> int:
        """Peers first (each saves what it did), then the monitor (it logs their last records, flushes W&B), then
        whatever is left of any process group."""
        print(f"{PROG}: stopping {self.args.run_id}: every peer writes its summary (up to {PEERS_GRACE_S:.0f} s; "
              f"Ctrl-C again to kill now)", flush=True)
        peers = [n for n in self.launcher.running() if n != "monitor"]
        self.launcher.ask_to_stop(peers)
        self._wait_for(peers, PEERS_GRACE_S)
        self.launcher.ask_to_stop([n for n in self.launcher.running() if n == "monitor"])
        self._wait_for(["monitor"] if "monitor" in self.launcher.procs else [], MONITOR_GRACE_S)
        return 130

    def _wait_for(self, names: list[str], seconds: float) -> None:
        asked, deadline = self.stop_asked, time.monotonic() + seconds
        while (any(self.launcher.procs[n].poll() is None for n in names) and time.monotonic() < deadline
               and self.stop_asked <= max(asked, 1)):
            time.sleep(0.2)

    def close(self) -> None:
        killed = self.launcher.close(grace=0.0 if self.stop_asked > 1 else 10.0)
        if killed:
            print(f"{PROG}: killed {len(killed)} leftover process(es)", flush=True)


def summary_table(run_dir: Path, wall_s: float | None = None) -> str:
    """The end of a run, per stage: peers, inner steps, tokens, tokens/s, rounds, whether the replicas ended on one
    model, the training loss over the last steps (one replica's last step is noise); then the final validation loss
    and where the results are."""
    by_stage: dict[int, list[dict]] = {}
    for path in sorted(glob.glob(str(run_dir / "stage*_peer*.json"))):
        s = json.loads(Path(path).read_text())
        by_stage.setdefault(s["stage"], []).append(s)
    if not by_stage:
        return "no peer summaries written"
    rows = [f"{'stage':<6}{'peers':>5}{'inner steps':>13}{'tokens':>10}{'tok/s':>9}{'rounds':>8}  {'replicas':<10}"
            f"train loss (last {LOSS_TAIL} steps)"]
    for stage, peers in sorted(by_stage.items()):
        steps = sorted(p["inner_steps"] for p in peers)
        hashes = {p["sync"].get("global_hash") for p in peers}
        agree = "-" if peers[0]["sync"].get("mode") == "none" or len(peers) == 1 else \
            "agree" if len(hashes) == 1 else f"{len(hashes)} models"
        tail = [loss for p in peers for _, loss in p["loss_curve"][-LOSS_TAIL:]]
        rows.append(f"{stage:<6}{len(peers):>5}{f'{steps[0]}-{steps[-1]}' if steps[0] != steps[-1] else steps[0]:>13}"
                    f"{count(sum(p['tokens'] for p in peers)):>10}{sum(p['tokens_per_s'] for p in peers):>9,.0f}"
                    f"{max(len(p['sync'].get('rounds', [])) for p in peers):>8}  {agree:<10}"
                    f"{f'{sum(tail) / len(tail):.4f}' if tail else '-'}")
    finals = [p["eval_curve"][-1] for p in by_stage.get(0, []) if p.get("eval_curve")]
    if finals:
        step = max(st for st, _ in finals)
        val = statistics.median(loss for st, loss in finals if st == step)
        rows.append(f"validation loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f}) at run step {step:g}, "
                    f"the median of stage 0's peers")
    rows.append(f"results in {run_dir}/: stage*_peer*.json (summaries), *.pt (weights), *.log, monitor.jsonl, wandb/"
                f"{f'; wall time {duration(wall_s)}' if wall_s else ''}")
    rows.append(f"next: python scripts/plot_run.py {run_dir}; swarm-peer export {run_dir} --out {run_dir}/model")
    return "\n".join(rows)


def stop_run(run_id: str | None) -> int:
    """`stop [RUN_ID]`: ask the runner to stop its run (as Ctrl-C would), then kill what is left."""
    runs = sorted(Path("runs").glob("*/pids"), key=lambda p: p.stat().st_mtime) if Path("runs").is_dir() else []
    run_dir = Path("runs") / run_id if run_id else (runs[-1].parent if runs else None)
    if run_dir is None or not run_dir.is_dir():
        _die(f"no run to stop{f' named {run_id}' if run_id else ''}")
    runner = run_dir / "runner.pid"
    pid = int(runner.read_text()) if runner.exists() else None
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + PEERS_GRACE_S + MONITOR_GRACE_S + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    for line in (run_dir / "pids").read_text().splitlines() if (run_dir / "pids").exists() else []:
        try:
            os.killpg(int(line.split()[0]), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass
    print(f"stopped run {run_dir.name}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.chdir(ROOT)
    if argv[:1] == ["stop"]:
        return stop_run(argv[1] if len(argv) > 1 else None)
    args = _parse(argv)
    if (Path("runs") / args.run_id).exists():
        _die(f"runs/{args.run_id} already exists; pick another --run-id")
    run = LocalRun(args)  # (makes the run's directory)
    (run.dir / "runner.pid").write_text(f"{os.getpid()}\n")
    (run.dir / "pids").touch()

    def on_signal(signum, _frame):
        run.stop_asked += 1

    started = time.monotonic()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        run.start()
        rc = run.wait()
    except LaunchError as e:
        print(f"{PROG}: {str(e).splitlines()[0]} (see {run.dir}/)", flush=True)
        run.shutdown()
        rc = 1
    finally:
        run.close()
    print(summary_table(run.dir, time.monotonic() - started))
    print(f"run {args.run_id} {'stopped' if rc == 130 else 'finished'}; summaries in {run.dir}/", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
