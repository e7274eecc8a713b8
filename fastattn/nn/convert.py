"""fastattn.convert: swap a model's torch attention and LSTM modules for fastattn's, in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn import functional as F

from fastattn.nn.attention import MultiheadAttention


def _mha_config(m: nn.MultiheadAttention) -> dict[str, Any]:
    return {
        "embed_dim": m.embed_dim,
        "num_heads": m.num_heads,
        "dropout": m.dropout,
        "bias": m.in_proj_bias is not None,
        "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": m.add_zero_attn,
        "kdim": m.kdim,
        "vdim": m.vdim,
        "batch_first": m.batch_first,
    }


def _lstm_config(m: nn.LSTM) -> dict[str, Any]:
    return {
        "input_size": m.input_size,
        "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "bias": m.bias,
        "batch_first": m.batch_first,
        "dropout": m.dropout,
        "bidirectional": m.bidirectional,
        "proj_size": m.proj_size,
    }


def _lstm_cell_config(m: nn.LSTMCell) -> dict[str, Any]:
    return {"input_size": m.input_size, "hidden_size": m.hidden_size, "bias": m.bias}


def _fastattn_lstm() -> type[nn.Module]:
    from fastattn.nn.lstm import LSTM  # imported on first use: the LSTM modules are optional here

    return LSTM


def _fastattn_lstm_cell() -> type[nn.Module]:
    from fastattn.nn.lstm import LSTMCell

    return LSTMCell


class _Rule:
    """Which torch module class becomes which fastattn class, and its constructor arguments."""

    def __init__(
        self,
        torch_cls: type[nn.Module],
        fastattn_cls: Callable[[], type[nn.Module]],
        config: Callable[[Any], dict[str, Any]],
    ) -> None:
        self.torch_cls = torch_cls
        self.fastattn_cls = fastattn_cls
        self.config = config

    def matches(self, module: nn.Module, include_subclasses: bool) -> bool:
        if type(module) is self.torch_cls:
            return True
        return (
            include_subclasses
            and isinstance(module, self.torch_cls)
            and not isinstance(module, self.fastattn_cls())
        )


def _replacement(module: nn.Module, rule: _Rule) -> nn.Module:
    """A fastattn module that holds ``module``'s own Parameter objects (so optimizers that
    already reference them keep working), on its device and dtype, in its train/eval mode."""
    first = next(iter(module.parameters()), None)
    factory = {} if first is None else {"device": first.device, "dtype": first.dtype}
    new = rule.fastattn_cls()(**rule.config(module), **factory)
    requires_grad = {id(p): p.requires_grad for p in module.parameters()}
    # assign=True installs the very tensors of state_dict(keep_vars=True) (it resets their
    # requires_grad to the new module's, hence the restore below); strict checks names/shapes.
    new.load_state_dict(module.state_dict(keep_vars=True), strict=True, assign=True)
    for p in new.parameters():
        p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
    new.train(module.training)
    return new


def _relu_in_place(layer: nn.Module) -> None:
    """A converted encoder or decoder layer's ReLU feed-forward activation, in place: torch's
    fused layer path applies it in place, but a layer holding fastattn's attention runs torch's
    Python path, whose F.relu writes a new [batch, seq, dim_feedforward] tensor (the converted
    TransformerEncoder ran 0.93-0.97x torch's in the quick grid on the Xeon with AMX; by hand at
    B4 S256 D512, 1.05x -> 1.10-1.17x with this). Same values; linear1's backward does not read
    its output, so autograd allows it. Other activations are left alone."""
    act = getattr(layer, "activation", None)
    if act is F.relu or (type(act) is nn.ReLU and not act.inplace):
        layer.activation = nn.ReLU(inplace=True)


def convert(
    model: nn.Module,
    attention: bool = True,
    lstm: bool = True,
    include_subclasses: bool = False,
) -> nn.Module:
    """Replaces, in place, every ``nn.MultiheadAttention`` (``attention``), ``nn.LSTM`` and
    ``nn.LSTMCell`` (``lstm``) inside ``model`` with fastattn's module of the same configuration.

    The new modules hold the old modules' Parameter objects (same values, device, dtype and
    ``requires_grad``; an optimizer built before the call still updates them) and keep their
    train/eval mode; forward hooks registered on the old modules are not carried over. A module
    shared by several parents is replaced by one shared module. Subclasses of the torch classes
    are left alone unless ``include_subclasses``. ``nn.TransformerEncoder`` containers whose first
    layer now holds a fastattn attention get ``use_nested_tensor = False``, as their constructor
    would have decided for such a layer: torch's nested-tensor fast path would bypass fastattn.
    ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` whose self-attention is now
    fastattn's apply a ReLU activation in place (an ``nn.ReLU(inplace=True)``; same values), as
    torch's fused layer path does: theirs would now write a new tensor.

    Idempotent. Returns ``model``, or its replacement when ``model`` itself is converted.
    """
    rules = []
    if attention:
        rules.append(_Rule(nn.MultiheadAttention, lambda: MultiheadAttention, _mha_config))
    if lstm:
        rules.append(_Rule(nn.LSTM, _fastattn_lstm, _lstm_config))
        rules.append(_Rule(nn.LSTMCell, _fastattn_lstm_cell, _lstm_cell_config))
    replaced: dict[int, nn.Module] = {}

    def swap(module: nn.Module) -> nn.Module:
        if id(module) not in replaced:
            rule = next((r for r in rules if r.matches(module, include_subclasses)), None)
            replaced[id(module)] = module if rule is None else _replacement(module, rule)
        return replaced[id(module)]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not child:
                setattr(parent, name, new)
    model = swap(model)

    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and len(module.layers) > 0:
            if isinstance(getattr(module.layers[0], "self_attn", None), MultiheadAttention):
                module.use_nested_tensor = False
        layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
        if isinstance(module, layers) and isinstance(module.self_attn, MultiheadAttention):
            _relu_in_place(module)
    return model
