import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Tests never reach a hub and never log to W&B online.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One corpus cache for the whole session, so the embedded corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("data_cache"))
