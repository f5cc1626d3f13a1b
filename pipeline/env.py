"""Process-wide settings that entry points choose (importing a package never changes them)."""
from __future__ import annotations

import os


def offline_by_default() -> None:
    """Hugging Face hub offline mode unless the user chose otherwise: the models this project
    loads are packaged or local folders (a hub id must already be in the cache), so nothing is
    downloaded and no request waits on a network that a node may not have. Call it at an entry
    point (a CLI's ``main``, a replica or actor constructor) before any model is loaded: the hub
    library reads the variable when it is first imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the tokenizers' Rust thread pool does not survive a fork (Ray workers, DataLoader workers):
    # off unless the user chose otherwise (importing ``inspector`` used to set this; it no longer does)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
