"""One rank of part h's reference: torch.distributed's gloo all-reduce of a stage's gradients (the same parameter
shapes as the swarm's stage), between processes on loopback, as the DiLoCo-SWARM reference code synchronizes them.

    python scripts/benchlib/gloo_allreduce.py --rank R --world N --port P --config C [--set K=V ...] --iters K --out F

Writes {"flat_s": [...], "per_tensor_s": [...], "params": n} to F: seconds per all-reduce of every gradient, as one
flat buffer and as one call per parameter tensor (both averaged: sum, then / N)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world", "--port", "--iters"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch
    import torch.distributed as dist

    from swarm_peer.config import load_config
    from swarm_peer.model import build_stage

    torch.set_num_threads(1)  # as the swarm's peers (run.threads=1)
    cfg = load_config(args.config, args.overrides)
    grads = [torch.randn_like(p) for p in build_stage(cfg, 0).parameters()]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=120))
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat_s, per_tensor_s = [], []
    for i in range(args.iters + 2):  # 2 warm-up calls each
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        flat.div_(args.world)
        if i >= 2:
            flat_s.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        for g in grads:
            dist.all_reduce(g)
            g.div_(args.world)
        if i >= 2:
            per_tensor_s.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    Path(args.out).write_text(json.dumps({"flat_s": flat_s, "per_tensor_s": per_tensor_s,
                                          "params": sum(g.numel() for g in grads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
