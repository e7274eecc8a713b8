import importlib.util
import os

import pytest
import torch

import fastattn

HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine (gpu tests run on a lent GPU)")
    no_triton = pytest.mark.skip(reason="triton is not installed")
    no_triton_device = pytest.mark.skip(
        reason="triton needs a CUDA GPU or TRITON_INTERPRET=1 (set before Python starts)"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(no_gpu)
        if "triton" in item.keywords:
            if not HAS_TRITON:
                item.add_marker(no_triton)
            elif not (HAS_GPU or TRITON_INTERPRETED):
                item.add_marker(no_triton_device)


def pytest_report_header(config):
    status = ", ".join(
        f"{name}={'usable' if s.usable else 'unavailable'}"
        for name, s in fastattn.backends().items()
    )
    return [f"fastattn backends: {status}"]
