"""Shared test setup: no hub traffic (nothing can be downloaded here); under pytest-xdist (``make test``), one
thread per worker and the test files with the most slow tests handed out first."""

import os
from collections import Counter

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # Each xdist worker gets one core's worth of intra-op threads: two workers with torch's default (one per core)
    # would oversubscribe a 2-core machine.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``make test`` runs ``--dist loadfile --no-loadscope-reorder``: each file is one unit of work (its module
    fixtures, such as a reference training run or a sweep, are built once), handed out in collection order. The files
    with the most tests marked slow go first, so the two workers end together instead of one finishing a long tail
    alone; within a file the order stays."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])
