"""Seeds the global random streams before every test and doctest (collected from the repo root).

Examples and tests must not depend on whatever a previous test left in the global RNG: an
unseeded ``torch.rand`` in a doctest once printed ``-0.0`` instead of ``0.0`` one run in six.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    """Seed Python's, NumPy's and torch's global generators with 0."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
