"""The GPU suite: every test here needs CUDA and is skipped, with the reason, without it."""

from __future__ import annotations

import pytest
import torch

REASON = "CUDA is not available (torch.cuda.is_available() is False): the GPU suite needs a GPU"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=REASON))
