"""Shared fixtures: the real data folder (skip where absent) and one Ray cluster per session."""
from __future__ import annotations

import os
import warnings
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


# ----------------------------------------------------------------------------- the fast tier
# ``make test-fast`` runs ``-m "not slow"``. Most slow tests carry ``@pytest.mark.slow`` in their own
# file; the ones below are marked here instead, so these files need not change for it:
SLOW_FILES = {
    "test_serve.py": "a Ray Serve application per session",
}
SLOW_TESTS = {
    "test_inspector.py": {
        "test_train_and_evaluate_cli": "trains an inspector through the CLI, then evaluates it",
        "test_training_is_reproducible": "trains two inspectors",
        "test_interrupted_build_leaves_the_previous_inspector_in_place": "trains an inspector",
        "test_ensemble_trains_saves_and_scores_as_measured": "trains an ensemble",
        "test_cached_top_layers_equal_a_full_pass": "fine-tunes the top layers",
        "test_evaluate_cli_on_the_test_split_int8": "the evaluate CLI on the real test split",
    },
    "test_serve_core.py": {
        "test_flow_correction_still_flagged_gets_the_fallback": "aligner generation and re-inspection, per policy",
        "test_flow_failure_policies": "aligner generation under every failure policy",
        "test_inspector_service_int8_setting": "builds and scores with a quantised encoder",
    },
}


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` (and ``ray``) by file, by name, and for every user of the ``ray_cluster`` fixture."""
    modules = {}
    for item in items:
        name = item.path.name
        modules.setdefault(name, getattr(item, "module", None))
        reason = SLOW_FILES.get(name) or SLOW_TESTS.get(name, {}).get(item.originalname or item.name)
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            reason = reason or "a local Ray cluster"
            item.add_marker(pytest.mark.ray)
        if reason:
            item.add_marker(pytest.mark.slow(reason=reason))
    stale = [f"{f}::{t}" for f, tests in SLOW_TESTS.items() if modules.get(f) is not None
             for t in tests if not hasattr(modules[f], t)]
    if stale:  # a renamed test would silently join the fast tier
        warnings.warn(f"conftest SLOW_TESTS names tests that no longer exist: {', '.join(stale)}")
