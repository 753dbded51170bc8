"""Shared fixtures: tiny offline data and models, fast Trainer settings."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture
def fast_trainer_kwargs(tmp_path):
    """Trainer arguments for quick CPU runs that write only under tmp_path."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
