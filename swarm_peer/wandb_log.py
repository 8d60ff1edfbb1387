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
