"""Shared fixtures: fast Trainer settings (the shared module, data and fit helpers: helpers.py)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import QUIET_TRAINER

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture
def fast_trainer_kwargs(tmp_path):
    """Trainer arguments for quick CPU runs that write only under tmp_path."""
    return dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        deterministic=True,
        **QUIET_TRAINER,
    )
