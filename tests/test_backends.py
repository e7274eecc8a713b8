"""Backend status, forcing and the errors for unknown or impossible backends."""

import contextlib
import warnings

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
    cpu = torch.device("cpu")
    assert backend_rules.choose("test", cpu, lambda name: None, reference_cost="") == expected


@pytest.fixture
def fake_cuda_backends(monkeypatch):
    """Every backend reports usable, so choose() runs its CUDA rules on metadata alone; the
    fallback warnings start unseen."""
    monkeypatch.setattr(backend_rules, "_status", lambda name: backend_rules.BackendStatus(
        True, True, ""))
    monkeypatch.setattr(backend_rules, "_warned_fallbacks", set())
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)


def test_auto_fallback_to_reference_on_cuda_warns_once_per_reason(fake_cuda_backends, recwarn):
    cuda = torch.device("cuda")
    warnings.simplefilter("always")  # the once-per-reason rule is ours, not the filter's
    for _ in range(3):
        assert backend_rules.choose(
            "op", cuda, lambda name: f"no {name} today", reference_cost="costs a lot"
        ) == "reference"
    fallbacks = [w for w in recwarn if w.category is backend_rules.ReferenceFallbackWarning]
    assert len(fallbacks) == 1
    message = str(fallbacks[0].message)
    assert "cuda: no cuda today" in message and "triton: no triton today" in message
    assert "reference backend, which costs a lot." in message
    backend_rules.choose("op", cuda, lambda name: "another reason", reference_cost="costs a lot")
    assert len([w for w in recwarn if w.category is backend_rules.ReferenceFallbackWarning]) == 2
    # The same reasons with another cost (another op family) warn again.
    backend_rules.choose("op2", cuda, lambda name: "another reason", reference_cost="is slow")
    assert len([w for w in recwarn if w.category is backend_rules.ReferenceFallbackWarning]) == 3


def test_fallback_warning_says_what_the_reference_costs_per_op_family(fake_cuda_backends,
                                                                      monkeypatch):
    """Attention's fallback names the L x S score matrix; the LSTM's (which has none) the
    unfused per-step ops."""
    from fastattn.ops import attention, lstm, packed_attention

    cuda = torch.device("cuda")
    with pytest.warns(backend_rules.ReferenceFallbackWarning) as attention_warnings:
        # float64: neither the cuda nor the triton attention kernels take it.
        got = attention._choose_backend("attention", cuda, torch.float64, 64, 64, 1, 1)
    assert got == "reference"
    assert "materializes the full L x S score matrix (O(L * S) memory)" in str(
        attention_warnings[0].message)
    with pytest.warns(backend_rules.ReferenceFallbackWarning) as varlen_warnings:
        packed_attention._choose_backend("attention_varlen", cuda, torch.float64, 64, 64, 1, 1)
    assert "loops over the sequences" in str(varlen_warnings[0].message)
    # A Triton-only install (no CUDA kernels in the extension) with float64, which no triton
    # kernel takes.
    monkeypatch.setattr(lstm, "_has_kernel", lambda op, key: key != "CUDA")
    with pytest.warns(backend_rules.ReferenceFallbackWarning) as lstm_warnings:
        got = lstm._choose_backend("lstm_layer", cuda, torch.float64, True)
    assert got == "reference"
    message = str(lstm_warnings[0].message)
    assert "fastattn.lstm_layer:" in message and "unfused PyTorch ops" in message
    assert "score matrix" not in message and "L * S" not in message


def test_auto_picks_a_fused_backend_or_cpu_without_a_warning(fake_cuda_backends, recwarn):
    warnings.simplefilter("always")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert backend_rules.choose("op", cuda, lambda name: None, reference_cost="") == "cuda"
    only_triton = lambda name: None if name == "triton" else "no"  # noqa: E731
    assert backend_rules.choose("op", cuda, only_triton, reference_cost="") == "triton"
    assert backend_rules.choose("op", cpu, lambda name: "no", reference_cost="") == "reference"
    assert not [w for w in recwarn if w.category is backend_rules.ReferenceFallbackWarning]


@pytest.mark.parametrize(
    "batch, heads, cuda_ok, triton_ok",
    [
        pytest.param(65535, 1, True, True, id="B65535-H1"),
        pytest.param(1, 65535, True, True, id="B1-H65535"),
        pytest.param(256, 256, True, False, id="B256-H256"),
        pytest.param(65536, 1, False, False, id="B65536-H1"),
        pytest.param(1, 65536, False, False, id="B1-H65536"),
    ],
)
def test_grid_limits_are_feature_checks_so_auto_falls_back(
    fake_cuda_backends, batch, heads, cuda_ok, triton_ok
):
    """The glue's grid limits (CUDA: heads on grid.y, batch on grid.z; Triton: B * Hq on grid.y,
    each <= 65535) are feature checks: auto picks another backend instead of the glue raising."""
    from fastattn.ops.attention import _choose_backend, _missing_feature

    def missing(name):
        return _missing_feature(name, torch.float16, 64, 64, batch=batch, q_heads=heads)

    assert (missing("cuda") is None) == cuda_ok
    assert (missing("triton") is None) == triton_ok
    if not cuda_ok:
        assert "65535" in missing("cuda")
    expected = "cuda" if cuda_ok else "triton" if triton_ok else "reference"
    with pytest.warns(backend_rules.ReferenceFallbackWarning) if expected == "reference" else (
        contextlib.nullcontext()
    ):
        got = _choose_backend("sdpa", torch.device("cuda"), torch.float16, 64, 64, batch, heads)
    assert got == expected
