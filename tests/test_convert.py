"""fastattn.convert: torch models keep their outputs, weights and modes, and really run fastattn."""

from __future__ import annotations

import copy
import importlib
import io
import pickle

import pytest
import torch
from helpers import assert_close_to_reference
from torch import nn

import fastattn

attention_ops = importlib.import_module("fastattn.ops.attention")

D, NHEAD, FF = 24, 4, 40  # an even head count, so torch's encoder fast path would apply


def _randomize_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _encoder(batch_first: bool, num_layers: int = 2, norm_first: bool = False) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        D, NHEAD, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )
    return _randomize_(nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=True))


def _count_fused_calls(monkeypatch) -> list[int]:
    """Counts the calls fastattn.MultiheadAttention makes into fastattn's fused attention op."""
    calls = [0]
    real = attention_ops.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "scaled_dot_product_attention", counting)
    return calls


def _count_torch_mha_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = nn.MultiheadAttention.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, "forward", counting)
    return calls


def _inputs(batch_first: bool, masks: str):
    B, L = 3, 7
    src = torch.randn(B, L, D) if batch_first else torch.randn(L, B, D)
    kwargs = {}
    if masks in ("padding", "both"):
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[0, 5:] = True  # left-aligned padding, so torch's nested-tensor path qualifies
        kpm[2, 3:] = True
        kwargs["src_key_padding_mask"] = kpm
    if masks in ("causal", "both"):
        # bool like the padding mask (torch deprecates mixing a bool and a float mask)
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(L).isinf()
        kwargs["is_causal"] = True
    return src, kwargs


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_encoder_matches_torch_and_runs_fastattn(monkeypatch, batch_first, masks, mode):
    theirs = _encoder(batch_first)
    ref64 = copy.deepcopy(theirs).double()
    ours = fastattn.convert(copy.deepcopy(theirs))
    for m in (theirs, ref64, ours):
        m.train(mode == "train")
    src, kwargs = _inputs(batch_first, masks)

    torch_calls = _count_torch_mha_calls(monkeypatch)
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        expected = theirs(src, **kwargs)
        if mode == "eval_no_grad" and batch_first:
            # The check below is meaningful: torch's own layer skips self_attn.forward here.
            assert torch_calls[0] == 0
        fused_calls = _count_fused_calls(monkeypatch)
        out = ours(src, **kwargs)
        assert fused_calls[0] == 2, "each converted layer must run fastattn's fused attention"
        kwargs64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in kwargs.items()}
        out64 = ref64(src.double(), **kwargs64)

    if mode == "eval_no_grad" and batch_first and masks == "padding":
        # torch's nested-tensor path returns zeros at padded positions; compare the real ones.
        keep = ~kwargs["src_key_padding_mask"]
        out, expected, out64 = out[keep], expected[keep], out64[keep]
    assert_close_to_reference(out, out64, expected, name="encoder output")

    if mode != "eval_no_grad":
        grad = torch.randn_like(out64)
        for o in (out, expected, out64):
            (o * grad.to(o.dtype)).sum().backward()
        for (name, p), p_t, p64 in zip(ours.named_parameters(), theirs.parameters(),
                                       ref64.parameters(), strict=True):
            assert_close_to_reference(p.grad, p64.grad, p_t.grad, name=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_converted_encoder_on_cuda_matches_torch(monkeypatch, dtype):
    """Head dim 32, so the CUDA kernels (or Triton) serve; forward and every parameter grad."""
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    theirs = _randomize_(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    theirs = theirs.to("cuda", dtype)
    ref64 = copy.deepcopy(theirs).double()
    ours = fastattn.convert(copy.deepcopy(theirs))
    src = torch.randn(3, 33, 128, device="cuda", dtype=dtype)
    kpm = torch.zeros(3, 33, dtype=torch.bool, device="cuda")
    kpm[1, 20:] = True
    calls = _count_fused_calls(monkeypatch)
    out = ours(src, src_key_padding_mask=kpm)
    assert calls[0] == 2
    expected = theirs(src, src_key_padding_mask=kpm)
    out64 = ref64(src.double(), src_key_padding_mask=kpm)
    assert_close_to_reference(out, out64, expected, name="encoder output")
    grad = torch.randn_like(out64)
    for o in (out, expected, out64):
        (o * grad.to(o.dtype)).sum().backward()
    for (name, p), p_t, p64 in zip(ours.named_parameters(), theirs.parameters(),
                                   ref64.parameters(), strict=True):
        assert_close_to_reference(p.grad, p64.grad, p_t.grad, name=f"d{name}")


def test_converted_encoder_disables_torchs_nested_tensor_path():
    model = _encoder(batch_first=True)
    assert model.use_nested_tensor
    fastattn.convert(model)
    assert not model.use_nested_tensor
    assert all(type(layer.self_attn) is fastattn.MultiheadAttention for layer in model.layers)


def test_converted_layers_apply_relu_in_place_and_leave_other_activations():
    # The encoder and transformer tests above check values and gradients through it.
    relu = _encoder(batch_first=True)
    module_relu = nn.TransformerEncoderLayer(D, NHEAD, FF, activation=nn.ReLU(), batch_first=True)
    gelu = nn.TransformerEncoderLayer(D, NHEAD, FF, activation="gelu", batch_first=True)
    decoder = nn.TransformerDecoderLayer(D, NHEAD, FF, batch_first=True)
    for model in (relu, module_relu, gelu, decoder):
        fastattn.convert(model)
    for layer in (*relu.layers, module_relu, decoder):
        assert type(layer.activation) is nn.ReLU and layer.activation.inplace
    assert gelu.activation is torch.nn.functional.gelu
    kept = nn.TransformerEncoderLayer(D, NHEAD, FF, batch_first=True)
    fastattn.convert(kept, attention=False)  # its attention stays torch's: so does its ReLU
    assert kept.activation is torch.nn.functional.relu


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_matches_torch(monkeypatch, mode):
    theirs = _randomize_(nn.Transformer(D, NHEAD, 1, 2, FF, dropout=0.0, batch_first=True))
    ref64 = copy.deepcopy(theirs).double()
    ours = fastattn.convert(copy.deepcopy(theirs))
    converted = [m for m in ours.modules() if isinstance(m, fastattn.MultiheadAttention)]
    assert len(converted) == 1 + 2 * 2  # encoder self, decoder self + cross per layer
    assert not any(isinstance(m, nn.MultiheadAttention) for m in ours.modules())
    for m in (theirs, ref64, ours):
        m.train(mode == "train")
    src, tgt = torch.randn(2, 7, D), torch.randn(2, 5, D)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5)
    calls = _count_fused_calls(monkeypatch)
    out = ours(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)
    assert calls[0] == 5
    expected = theirs(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)
    out64 = ref64(src.double(), tgt.double(), tgt_mask=tgt_mask.double(), tgt_is_causal=True)
    assert_close_to_reference(out, out64, expected, name="transformer output")


def test_keeps_parameter_objects_modes_and_requires_grad():
    model = nn.Sequential(nn.Linear(D, D), nn.MultiheadAttention(D, NHEAD, kdim=10, vdim=6))
    old = model[1]
    old.eval()
    old.out_proj.weight.requires_grad_(False)
    params = {name: p for name, p in old.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert fastattn.convert(model) is model
    new = model[1]
    assert type(new) is fastattn.MultiheadAttention and not new.training and model[0].training
    assert new.kdim == 10 and new.vdim == 6
    new_params = dict(new.named_parameters())
    assert list(new_params) == list(params)
    for name, p in params.items():
        assert new_params[name] is p, f"{name} is not the same Parameter object"
    assert not new.out_proj.weight.requires_grad and new.q_proj_weight.requires_grad

    # An optimizer built before convert still trains the converted module.
    before = new.q_proj_weight.detach().clone()
    q, kv_k, kv_v = torch.randn(5, 2, D), torch.randn(4, 2, 10), torch.randn(4, 2, 6)
    new(model[0](q), kv_k, kv_v, need_weights=False)[0].sum().backward()
    optimizer.step()
    assert not torch.equal(new.q_proj_weight, before)


def test_keeps_device_and_dtype():
    model = _encoder(batch_first=True).to(torch.float64)
    fastattn.convert(model)
    for p in model.parameters():
        assert p.dtype == torch.float64 and p.device.type == "cpu"
    out = model(torch.randn(2, 5, D, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_idempotent():
    model = fastattn.convert(_encoder(batch_first=False))
    modules = list(model.modules())
    assert fastattn.convert(model) is model
    assert all(a is b for a, b in zip(modules, model.modules(), strict=True))


class _MyMHA(nn.MultiheadAttention):
    pass


def test_subclasses_only_when_asked():
    model = nn.ModuleDict({"plain": nn.MultiheadAttention(D, NHEAD), "sub": _MyMHA(D, NHEAD)})
    fastattn.convert(model)
    assert type(model["plain"]) is fastattn.MultiheadAttention
    assert type(model["sub"]) is _MyMHA
    fastattn.convert(model, include_subclasses=True)
    assert type(model["sub"]) is fastattn.MultiheadAttention


def test_attention_false_and_shared_and_root_modules():
    shared = nn.MultiheadAttention(D, NHEAD)
    model = nn.ModuleList([shared, nn.Sequential(shared)])
    assert fastattn.convert(model, attention=False) is model and model[0] is shared
    fastattn.convert(model)
    assert type(model[0]) is fastattn.MultiheadAttention and model[1][0] is model[0]
    root = nn.MultiheadAttention(D, NHEAD)
    new = fastattn.convert(root)
    assert type(new) is fastattn.MultiheadAttention and new.in_proj_weight is root.in_proj_weight


def test_lstm_and_lstm_cell_are_converted():
    from fastattn.nn.lstm import LSTM, LSTMCell  # the LSTM modules (fastattn/nn/lstm.py)

    model = nn.ModuleDict({
        "lstm": nn.LSTM(6, 8, num_layers=2, batch_first=True),
        "cell": nn.LSTMCell(6, 8),
        "mha": nn.MultiheadAttention(D, NHEAD),
    })
    _randomize_(model)
    theirs = copy.deepcopy(model)
    fastattn.convert(model, attention=False)
    assert type(model["lstm"]) is LSTM and type(model["cell"]) is LSTMCell
    assert type(model["mha"]) is nn.MultiheadAttention
    assert model["lstm"].state_dict().keys() == theirs["lstm"].state_dict().keys()
    x = torch.randn(3, 5, 6)
    out, (h, c) = model["lstm"](x)
    out_t, (h_t, c_t) = theirs["lstm"](x)
    for a, b in ((out, out_t), (h, h_t), (c, c_t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hc = (torch.randn(3, 8), torch.randn(3, 8))
    for a, b in zip(model["cell"](x[:, 0], hc), theirs["cell"](x[:, 0], hc), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lstm_false_leaves_lstms():
    model = nn.Sequential(nn.LSTM(6, 8))
    fastattn.convert(model, lstm=False)
    assert type(model[0]) is nn.LSTM


def test_pickle_deepcopy_and_to_dtype_of_converted_encoder():
    model = fastattn.convert(_encoder(batch_first=True)).eval()
    src = torch.randn(2, 5, D)
    expected = model(src)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
                  torch.load(buffer, weights_only=False)):
        assert type(clone.layers[0].self_attn) is fastattn.MultiheadAttention
        assert torch.equal(clone(src), expected)
    as64 = copy.deepcopy(model).to(torch.float64)
    torch.testing.assert_close(as64(src.double()).float(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_fullgraph_converted_encoder_layer(monkeypatch, mode):
    """One graph through the converted layer and fastattn's op (forward, and backward in train).
    aot_eager traces what inductor would receive, without its minutes of C++ compilation here."""
    torch._dynamo.reset()
    layer = nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, batch_first=True)
    layer = fastattn.convert(_randomize_(layer)).train(mode == "train")
    src = torch.randn(2, 7, D)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    expected = layer(src, src_key_padding_mask=kpm)
    calls = _count_fused_calls(monkeypatch)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(src, src_key_padding_mask=kpm)
    assert calls[0] >= 1  # traced through fastattn's op, not torch's fast path
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if mode == "train":
        grad = torch.randn_like(out)
        (out * grad).sum().backward()
        compiled_grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        (expected * grad).sum().backward()
        for g, g_eager in zip(compiled_grads, (p.grad for p in layer.parameters()), strict=True):
            torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-5)
