"""Weights & Biases, never blocking: online when an API key is configured, offline otherwise."""
from __future__ import annotations

import netrc
import os


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def open_run(project: str, entity: str | None = None, name: str | None = None, config: dict | None = None,
             directory: str | None = None, job_type: str = "train"):
    """wandb.init that never prompts: respects WANDB_MODE, else online only with a key, else offline."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
    if directory:
        os.makedirs(directory, exist_ok=True)
    return wandb.init(project=project, entity=entity, name=name, config=config, dir=directory, mode=mode,
                      job_type=job_type, reinit="finish_previous",
                      settings=wandb.Settings(init_timeout=60, silent=True, console="off"))


def read_history(run_file: str) -> list[dict]:
    """The logged history of a W&B run file (`run-*.wandb`, e.g. an offline run): one dict per `log` call.

    The file is a LevelDB-style log (7-byte ':W&B' header, 32 KiB blocks of chunks: crc32c(4) length(2, LE) type(1);
    types FULL/FIRST/MIDDLE/LAST) of `wandb_internal_pb2.Record` messages; we keep the `history` records."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file} is not a W&B run file")
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too small for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
