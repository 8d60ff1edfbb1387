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


@pytest.fixture
def swarm_factory(tmp_path, cache_dir):
    """Swarm(s) of real peer processes; every process (p2pd included) is gone after the test, or it fails."""
    from tests.swarm_harness import Swarm

    swarms = []

    def make(run_id, overrides=()):
        s = Swarm(tmp_path, run_id, list(overrides), cache_dir)
        swarms.append(s)
        return s

    yield make
    for s in swarms:
        leftovers = s.cleanup()
        assert not leftovers, f"processes outlived their peers: {leftovers}"
