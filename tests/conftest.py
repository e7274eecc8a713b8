import importlib.util
import os

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

import fastattn

HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def inductor_cache_dir_per_isa() -> str:
    """Inductor's cache dir with a subfolder per CPU ISA. Inductor's FX graph and AOTAutograd
    cache keys omit ATEN_CPU_CAPABILITY (torch 2.13), so a graph compiled under AVX-512 is served
    to a run under avx2 (and computes garbage there). A subprocess inherits the variable already
    keyed: its parent folder is the root."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    if os.path.basename(root).startswith("isa-"):
        root = os.path.dirname(root)
    return os.path.join(root, "isa-" + torch.backends.cpu.get_cpu_capability().lower())


os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir_per_isa()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def inductor():
    """torch.compile with Inductor, fullgraph, on a fresh dynamo state. Inductor's FX graph and
    AOTAutograd caches are off: their keys omit ATEN_CPU_CAPABILITY, so a graph cached under
    AVX-512 (16-lane loops) is served to an AVX2 run (8-lane vectors) and computes garbage;
    seen with torch 2.13 and plain torch code, without fastattn."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield lambda f, dynamic=False: torch.compile(f, backend="inductor", fullgraph=True,
                                                     dynamic=dynamic)
    torch._dynamo.reset()


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
