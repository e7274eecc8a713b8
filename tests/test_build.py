"""Build facts, `python -m fastattn.info`, and importing fastattn without the extension."""

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="one kernel build per x86 ISA exists on x86 only")
def test_each_isa_build_has_its_own_vector_namespace():
    # The *.isa.cpp kernels are compiled once per x86 ISA. ATen's vector types live in the inline
    # namespace at::vec::CPU_CAPABILITY, which each build must name after its ISA: under one shared
    # name an out-of-line at::vec function (the compiler's inlining choice) of one ISA's object
    # serves the other ISAs' calls, with another vector width and register ABI: memory corruption.
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    assert _extension.C is not None, f"fastattn._C did not load: {_extension.LOAD_ERROR}"
    symbols = subprocess.run([nm, "-C", _extension.C.__file__], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    expected = {"isa_default": "DEFAULT", "isa_avx2": "AVX2", "isa_avx512": "AVX512"}
    checked = set()
    for symbol in symbols:
        isa = re.search(r"fastattn::(isa_\w+)::", symbol)
        for namespace in re.findall(r"at::vec::(\w+)::", symbol) if isa else ():
            assert namespace == expected[isa.group(1)], symbol
            checked.add(isa.group(1))
    assert checked == set(expected), f"no at::vec symbols found for {set(expected) - checked}"


def test_info_prints_versions_backends_and_isa():
    out = subprocess.run(
        [sys.executable, "-m", "fastattn.info"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for fact in ("torch", "cpu isa used", "backends", "reference: usable", "gpu"):
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
