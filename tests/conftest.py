"""Shared fixtures: the real data folder (skip where absent) and one Ray cluster per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public safety data in ../shared/data; tests that need it skip where it is absent."""
    if not (SHARED_DATA / "labeled_pairs.jsonl").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set SHARED_DATA_DIR or clone beside shared/)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and far faster on a busy shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (start and stop cost ~5 s each)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
