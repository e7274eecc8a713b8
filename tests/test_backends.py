"""Backend status, forcing and the errors for unknown or impossible backends."""

import pytest
import torch

import fastattn
from fastattn.ops import backends as backend_rules


def test_backends_report_every_backend_with_reasons():
    status = fastattn.backends()
    assert set(status) == {"cpu", "cuda", "triton", "reference"}
    assert status["reference"].usable
    for name, s in status.items():
        assert s.usable or s.reason, f"{name} is unusable but gives no reason"
        assert not (s.usable and not s.built), name


def test_unknown_backend_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: cpu, cuda, triton, reference, auto"):
        with fastattn.use_backend("flash"):
            pass


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "cudnn")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="FASTATTN_BACKEND: unknown fastattn backend 'cudnn'"):
        fastattn.scaled_dot_product_attention(q, q, q)


def test_forced_backend_for_wrong_device_names_the_problem():
    q = torch.randn(1, 1, 4, 8)
    if not fastattn.backends()["cuda"].usable:
        with pytest.raises(RuntimeError, match="forced backend 'cuda' is unavailable"):
            with fastattn.use_backend("cuda"):
                fastattn.scaled_dot_product_attention(q, q, q)


def test_forced_backend_missing_feature_is_named(monkeypatch):
    # Force the triton backend onto a float64 call: it must name the dtype, not fall back.
    monkeypatch.setattr(
        backend_rules, "_status", lambda name: backend_rules.BackendStatus(True, True, "")
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="cannot serve this call: dtype float64"):
        with fastattn.use_backend("triton"):
            fastattn.scaled_dot_product_attention(q, q, q)


def test_forced_cpu_backend_rejects_cuda_only_rule():
    assert backend_rules._device_mismatch("cpu", torch.device("cuda")) is not None
    assert backend_rules._device_mismatch("cuda", torch.device("cpu")) is not None
    assert backend_rules._device_mismatch("reference", torch.device("cpu")) is None


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert backend_rules.forced_backend() == "reference"
    with fastattn.use_backend("auto"):
        assert backend_rules.forced_backend() is None


def test_auto_prefers_compiled_cpu_backend_for_cpu_tensors():
    expected = "cpu" if fastattn.backends()["cpu"].usable else "reference"
    assert backend_rules.choose("test", torch.device("cpu"), lambda name: None) == expected
