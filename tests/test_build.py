"""Build facts, `python -m fastattn.info`, and importing fastattn without the extension."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import fastattn
from fastattn import _extension

ROOT = Path(__file__).resolve().parents[1]


def test_extension_reports_build_facts():
    C = _extension.C
    assert C is not None, f"fastattn._C did not load: {_extension.LOAD_ERROR}"
    assert C.cpu_isa() in ("default", "avx2", "avx512")
    assert C.torch_version().split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(C.built_with_cuda(), bool)
    assert C.built_with_cuda() == bool(C.cuda_archs())


def test_the_one_cuda_head_dim_list_matches_the_compiled_instances():
    """csrc/include/fastattn/attention_head_dims.h is the only list: Python reads it from _C,
    and each entry has its forward and backward instance file per dtype (no more, no less)."""
    from fastattn.ops.attention import CUDA_HEAD_DIMS

    C = _extension.C
    assert C is not None, f"fastattn._C did not load: {_extension.LOAD_ERROR}"
    head_dims = C.attention_cuda_head_dims()
    assert head_dims == sorted(set(head_dims)) and CUDA_HEAD_DIMS == tuple(head_dims)
    instances = {p.name for p in (ROOT / "csrc" / "attention" / "instances").glob("*.cu")}
    assert instances == {
        f"attention_{pass_}_{dtype}_hdim{e}.cu"
        for pass_ in ("fwd", "bwd") for dtype in ("fp16", "bf16") for e in head_dims
    }


def test_info_prints_versions_backends_and_isa():
    out = subprocess.run(
        [sys.executable, "-m", "fastattn.info"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for fact in ("torch", "cpu isa used", "tile engine", "linear gemm", "backends",
                 "reference: usable", "gpu"):
        assert fact in out, f"{fact!r} missing from:\n{out}"


def test_import_without_extension_warns_once_and_reference_serves(tmp_path):
    shutil.copytree(
        ROOT / "fastattn",
        tmp_path / "fastattn",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    # -S skips site hooks, so an editable install of fastattn cannot shadow the bare copy;
    # torch's own site-packages directory is put back on the path by hand.
    site_packages = Path(torch.__file__).resolve().parents[1]
    script = (
        f"import sys; sys.path[:0] = [{str(tmp_path)!r}]; sys.path.append({str(site_packages)!r})\n"
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastattn\n"
        "print(sum('could not be loaded' in str(x.message) for x in w))\n"
        "s = fastattn.backends()\n"
        "print(s['cpu'].usable, s['reference'].usable)\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "print(fastattn.scaled_dot_product_attention(q, q, q).shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path,
        check=True,
    ).stdout.split("\n")
    assert out[0] == "1", out
    assert out[1] == "False True", out
    assert out[2] == "torch.Size([1, 2, 5, 8])", out


def test_public_api_is_exported():
    for name in ("scaled_dot_product_attention", "attention", "backends", "use_backend"):
        assert hasattr(fastattn, name), name
