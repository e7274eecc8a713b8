"""Drop-in ``nn.LSTMCell`` / ``nn.LSTM`` served by the fused fastattn LSTM ops.

Constructor arguments, parameter names, shapes, initialization and the forward contract follow
torch's modules, so ``load_state_dict`` works both ways. Both add, as constructor options:
``layer_norm`` (LayerNorm-LSTM), ``zoneout=(p_cell, p_hidden)`` and ``recurrent_dropout``
(DropConnect on ``weight_hh``, one mask per forward).
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from fastattn.ops.errors import FastattnDtypeError, FastattnTypeError, FastattnValueError
from fastattn.ops.lstm import lstm_cell, lstm_layer

__all__ = ["LSTMCell", "LSTM"]


def _check_extras(zoneout, recurrent_dropout) -> tuple[float, float]:
    zoneout = (0.0, 0.0) if zoneout is None else tuple(float(p) for p in zoneout)
    if len(zoneout) != 2 or not all(0 <= p < 1 for p in zoneout):
        raise FastattnValueError(
            f"zoneout must be (p_cell, p_hidden) with each p in [0, 1), got {zoneout}")
    if not 0 <= recurrent_dropout < 1:
        raise FastattnValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout}")
    return zoneout


class _Extras:
    """The options fastattn adds to torch's LSTM modules: masks and LayerNorm parameters."""

    def reset_parameters(self) -> None:
        """torch's init (uniform in +-1/sqrt(hidden_size)); LayerNorm gains one, biases zero."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name, weight in self.named_parameters():
            if name.startswith("layer_norm_"):
                nn.init.zeros_(weight) if "c_bias" in name else nn.init.ones_(weight)
            else:
                nn.init.uniform_(weight, -stdv, stdv)

    def _recurrent_weight(self, w_hh: torch.Tensor) -> torch.Tensor:
        if self.training and self.recurrent_dropout > 0:
            keep = 1.0 - self.recurrent_dropout
            return w_hh * torch.bernoulli(torch.full_like(w_hh, keep)) / keep
        return w_hh

    def _zoneout_weights(self, p: float, shape: tuple[int, ...], like: torch.Tensor):
        if p == 0:
            return None
        full = like.new_full(shape, p)
        return torch.bernoulli(full) if self.training else full


class LSTMCell(_Extras, nn.Module):
    """``torch.nn.LSTMCell`` on the fused fastattn LSTM ops, with LSTM's optional extras.

    Arguments as nn.LSTMCell (input_size, hidden_size, bias=True, device=None, dtype=None), plus
    the keyword options of ``fastattn.LSTM`` for one step: ``layer_norm`` (parameters
    ``layer_norm_ih``, ``layer_norm_hh`` [4H], ``layer_norm_c_weight``, ``layer_norm_c_bias``
    [H]), ``zoneout=(p_cell, p_hidden)`` and ``recurrent_dropout`` (one weight_hh mask per
    forward). A cell with the same weights and masks computes what a one-layer
    ``fastattn.LSTM`` computes for one time step.

    forward(input [B, I] or [I], hx=None or (h [B, H], c [B, H])) -> (h', c').
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, layer_norm: bool = False,
                 zoneout: tuple[float, float] | None = None,
                 recurrent_dropout: float = 0.0) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.layer_norm = layer_norm
        self.zoneout = _check_extras(zoneout, recurrent_dropout)
        self.recurrent_dropout = float(recurrent_dropout)
        self.layer_norm_eps = 1e-5
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if layer_norm:  # after torch's parameters, so seeded init of those matches nn.LSTMCell
            for kind, n in (("ih", 4 * hidden_size), ("hh", 4 * hidden_size),
                            ("c_weight", hidden_size), ("c_bias", hidden_size)):
                setattr(self, f"layer_norm_{kind}", nn.Parameter(torch.empty(n, **factory)))
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")
        for key, default in (("layer_norm", False), ("zoneout", (0.0, 0.0)),
                             ("recurrent_dropout", 0.0)):
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)}"
        return s

    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if input.dim() not in (1, 2):
            raise FastattnValueError(
                f"fastattn.LSTMCell: input must be [B, {self.input_size}] or "
                f"[{self.input_size}], got shape {list(input.shape)}"
            )
        if hx is None:
            shape = (input.shape[0], self.hidden_size) if input.dim() == 2 else (self.hidden_size,)
            zeros = input.new_zeros(shape)
            hx = (zeros, zeros)
        elif input.dim() == 2 and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            # batched only: unbatched, nn.LSTMCell takes hx[0] and hx[1] of whatever it is given
            raise FastattnTypeError(
                f"fastattn.LSTMCell: hx must be a tuple (h_0, c_0), got {_describe(hx)}"
                + (f" of {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
        # Under autocast torch's lstm_cell runs its GEMMs in the autocast dtype (as lstm_cell
        # does) and the pointwise part in the state's dtype (cx's): the arguments go to that.
        dtype = None
        w_ih, w_hh, b_ih, b_hh = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        if _autocast_dtype(input, w_ih) is not None and isinstance(hx[1], torch.Tensor):
            dtype = hx[1].dtype
            input, hx = input.to(dtype), (_cast(hx[0], dtype), hx[1])
            w_ih, w_hh, b_ih, b_hh = (_cast(t, dtype) for t in (w_ih, w_hh, b_ih, b_hh))
        w_hh = self._recurrent_weight(w_hh)
        if not self.layer_norm and self.zoneout == (0.0, 0.0):
            return lstm_cell(input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)
        # The extras run as a one-step fastattn.lstm_layer (which checks the arguments).
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        h, c = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if unbatched else hx
        B, H = x.shape[0], self.hidden_size
        ln = None
        if self.layer_norm:
            ln = (*(_cast(t, dtype) for t in (self.layer_norm_ih, self.layer_norm_hh,
                                               self.layer_norm_c_weight, self.layer_norm_c_bias)),
                  self.layer_norm_eps)
        h_all, c_all = lstm_layer(
            x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh,
            zoneout_c=self._zoneout_weights(self.zoneout[0], (1, B, H), x),
            zoneout_h=self._zoneout_weights(self.zoneout[1], (1, B, H), x), layer_norm=ln)
        hy, cy = h_all[0], c_all[0]
        return (hy.squeeze(0), cy.squeeze(0)) if unbatched else (hy, cy)


class LSTM(_Extras, nn.Module):
    """``torch.nn.LSTM`` on the fused fastattn LSTM ops, with optional extras.

    Arguments as nn.LSTM (input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None), plus:

    - ``layer_norm``: LayerNorm-LSTM. Per layer and direction, gates = LN(x W_ih^T) * g_ih +
      LN(h W_hh^T) * g_hh + b_ih + b_hh (LN over the 4H gates), c = LN(f c + i g) * g_c + b_c,
      h = o tanh(c); parameters ``layer_norm_ih_l{k}``, ``layer_norm_hh_l{k}`` [4H],
      ``layer_norm_c_weight_l{k}``, ``layer_norm_c_bias_l{k}`` [H] (``_reverse`` suffixed too),
      initialized to ones / zeros.
    - ``zoneout=(p_cell, p_hidden)``: in training each state element keeps its previous value
      with probability p (fresh Bernoulli per step); in eval the states mix with weight p.
    - ``recurrent_dropout=p``: in training, DropConnect on weight_hh (one mask per forward,
      kept weights scaled by 1 / (1 - p)).

    Random masks are drawn from torch's default generator, per layer and direction in this
    order: the weight_hh mask, the cell zoneout mask [T, B, H], the hidden zoneout mask
    [T, B, P]; then the between-layer dropout (the same draws nn.LSTM makes for ``dropout``).
    The layer_norm option runs fused on the cpu and cuda backends (fastattn::lstm_ln_layer_*
    ops, one call per layer and direction).

    forward(input, hx=None) -> (output, (h_n, c_n)) exactly as nn.LSTM: input [T, B, I]
    ([B, T, I] with batch_first), [T, I] unbatched, or a PackedSequence (sorted or not).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        layer_norm: bool = False,
        zoneout: tuple[float, float] | None = None,
        recurrent_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(
                dropout, bool):
            raise FastattnValueError(
                "dropout should be a number in range [0, 1] representing the "
                f"probability of an element being zeroed, got {dropout}"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          f"non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=2)
        # nn.LSTM's checks, in its order and with its exception types
        for name, value, kind in (("bias", bias, bool), ("batch_first", batch_first, bool),
                                  ("input_size", input_size, int),
                                  ("hidden_size", hidden_size, int),
                                  ("num_layers", num_layers, int)):
            if not isinstance(value, kind):
                raise FastattnTypeError(
                    f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")
            if kind is int and value <= 0:
                raise FastattnValueError(f"{name} must be greater than zero, got {value}")
        if proj_size < 0:
            raise FastattnValueError(
                "proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise FastattnValueError("proj_size has to be smaller than hidden_size")
        zoneout = _check_extras(zoneout, recurrent_dropout)
        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.layer_norm = layer_norm
        self.zoneout = zoneout
        self.recurrent_dropout = float(recurrent_dropout)
        self.layer_norm_eps = 1e-5
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        G = 4 * hidden_size
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else real_hidden * directions
            for suffix in self._suffixes():
                shapes = [("weight_ih", (G, layer_input)), ("weight_hh", (G, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (G,)), ("bias_hh", (G,))]
                if proj_size > 0:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                for kind, shape in shapes:
                    name = f"{kind}_l{layer}{suffix}"
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name)
        if layer_norm:  # after torch's parameters, so seeded init of those matches nn.LSTM
            for layer in range(num_layers):
                for suffix in self._suffixes():
                    for kind, n in (("ih", G), ("hh", G), ("c_weight", hidden_size),
                                    ("c_bias", hidden_size)):
                        setattr(self, f"layer_norm_{kind}_l{layer}{suffix}",
                                nn.Parameter(torch.empty(n, **factory)))
        self.reset_parameters()

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def flatten_parameters(self) -> None:
        """Kept for nn.LSTM compatibility: the fused ops need no flat weight buffer."""

    @property
    def _flat_weights(self) -> list[nn.Parameter | None]:
        """nn.LSTM's list of the parameters in _flat_weights_names order (read by user code)."""
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        per = len(self._flat_weights_names) // (self.num_layers * len(self._suffixes()))
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[i:i + per]] for i in range(0, len(names), per)]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for key, default in (("proj_size", 0), ("num_layers", 1), ("bias", True),  # nn.LSTM's
                             ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                             ("layer_norm", False), ("zoneout", (0.0, 0.0)),
                             ("recurrent_dropout", 0.0)):
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)}"
        return s

    def _layer_weights(self, layer: int, suffix: str, dtype: torch.dtype | None):
        def get(kind):
            return _cast(getattr(self, f"{kind}_l{layer}{suffix}", None), dtype)

        w_hh = self._recurrent_weight(get("weight_hh"))
        ln = None
        if self.layer_norm:
            ln = (get("layer_norm_ih"), get("layer_norm_hh"), get("layer_norm_c_weight"),
                  get("layer_norm_c_bias"), self.layer_norm_eps)
        return get("weight_ih"), w_hh, get("bias_ih"), get("bias_hh"), get("weight_hr"), ln

    def forward(self, input, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        H = self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            T, B = batch_sizes.shape[0], int(batch_sizes[0])
            valid = (torch.arange(B)[None, :] < batch_sizes[:, None]).flatten()
            rows = valid.nonzero().squeeze(1).to(data.device)  # packed row -> t * B + b
            x = data.new_zeros(T * B, data.shape[-1]).index_copy(0, rows, data)
            x = x.view(T, B, -1)
            unbatched = False
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise FastattnValueError(
                    "fastattn.LSTM: input must be a 3-D (batched) or 2-D (unbatched) "
                    f"tensor or a PackedSequence, got {_describe(input)}"
                )
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (
                input.transpose(0, 1) if self.batch_first else input)
            T, B = x.shape[0], x.shape[1]
            batch_sizes = sorted_indices = unsorted_indices = None
        # Under autocast nn.LSTM runs in the autocast dtype (mkldnn_rnn_layer on the CPU,
        # _cudnn_rnn on CUDA are on autocast's lower-precision lists): so do we, casting input,
        # state and weights. Its packed path, and on the CPU its projection path (mkldnn has no
        # projection), run its GEMMs so but the pointwise part in the state's dtype (c_0's, the
        # input's without hx): there we run all in that dtype. With a projection, h is its
        # GEMM's output there, so output and h_n come out in the autocast dtype (h_dtype), c_n
        # in the state's.
        w0 = self.weight_ih_l0
        dtype = _autocast_dtype(x, w0)
        h_dtype = None
        if dtype is not None and (packed or (self.proj_size > 0 and x.device.type == "cpu")):
            if self.proj_size > 0:
                h_dtype = dtype
            c0 = hx[1] if isinstance(hx, (tuple, list)) and len(hx) == 2 else None
            dtype = c0.dtype if isinstance(c0, torch.Tensor) else x.dtype
        if dtype is not None:
            x = x.to(dtype)
        elif x.dtype != w0.dtype:  # nn.LSTM raises ValueError, fastattn TypeError
            raise FastattnDtypeError(
                f"fastattn.LSTM: input must be {str(w0.dtype)[6:]} as the weights, got "
                f"{x.dtype}: convert the input (input.to({w0.dtype})) or the model "
                f"(model.to({x.dtype}))")
        if T == 0:  # no last step to return as h_n; torch refuses it too (RuntimeError)
            raise FastattnValueError(
                "fastattn.LSTM: expected sequence length to be larger than 0, got input of "
                f"{_describe(input)} (batch_first={self.batch_first})")
        if x.shape[-1] != self.input_size:
            raise FastattnValueError(
                f"fastattn.LSTM: input must have {self.input_size} features "
                f"(input_size), got {x.shape[-1]}"
            )
        h0, c0 = self._initial_state(hx, x, unbatched, sorted_indices, D, B, P, H, dtype)

        zc_p, zh_p = self.zoneout
        step_sizes = batch_sizes if packed and int(batch_sizes[-1]) < B else None
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(self._suffixes()):
                w_ih, w_hh, b_ih, b_hh, w_hr, ln = self._layer_weights(layer, suffix, dtype)
                k = layer * D + d
                h_all, c_all = lstm_layer(
                    x, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes=step_sizes,
                    reverse=d == 1, zoneout_c=self._zoneout_weights(zc_p, (T, B, H), x),
                    zoneout_h=self._zoneout_weights(zh_p, (T, B, P), x), layer_norm=ln)
                last = 0 if d == 1 else -1
                h_n.append(h_all[last])
                c_n.append(c_all[last])
                outputs.append(h_all)
            x = outputs[0] if D == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                if packed:  # over the packed rows only: the mask nn.LSTM draws from the same RNG
                    flat = x.reshape(T * B, -1)
                    kept = F.dropout(flat.index_select(0, rows), self.dropout, training=True)
                    x = flat.index_copy(0, rows, kept).view(T, B, -1)
                else:
                    x = F.dropout(x, self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if h_dtype is not None:
            x, h_n = x.to(h_dtype), h_n.to(h_dtype)

        if packed:
            output = PackedSequence(x.reshape(T * B, -1).index_select(0, rows), batch_sizes,
                                    sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = c_n.index_select(1, unsorted_indices)
            return output, (h_n, c_n)
        if unbatched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        output = x.transpose(0, 1) if self.batch_first else x
        return output, (h_n, c_n)

    def _initial_state(self, hx, x, unbatched, sorted_indices, D, B, P, H, dtype):
        L = self.num_layers * D
        if hx is None:
            return x.new_zeros(L, B, P), x.new_zeros(L, B, H)
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise FastattnTypeError("fastattn.LSTM: hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
        if dtype is not None:  # autocast: any floating state runs in the autocast dtype
            h0, c0 = _cast(h0, dtype), _cast(c0, dtype)
        want_h, want_c = ((L, P), (L, H)) if unbatched else ((L, B, P), (L, B, H))
        for name, t, want in (("h_0", h0, want_h), ("c_0", c0, want_c)):
            if not isinstance(t, torch.Tensor):
                raise FastattnTypeError(
                    f"fastattn.LSTM: hx {name} must be a Tensor, got {type(t).__name__}")
            width = "proj_size" if name == "h_0" and self.proj_size else "hidden_size"
            if tuple(t.shape) != want:
                raise RuntimeError(
                    f"fastattn.LSTM: expected hx {name} of shape {list(want)} (num_layers * "
                    f"num_directions, batch, {width}), got {list(t.shape)}")
            if t.dtype != x.dtype or t.device != x.device:
                raise RuntimeError(
                    f"fastattn.LSTM: hx {name} must have the input's dtype and device "
                    f"({x.dtype}, {x.device}), got ({t.dtype}, {t.device})")
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        if sorted_indices is not None:
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        return h0, c0


def _cast(t, dtype: torch.dtype | None):
    """t in dtype (autocast's choice), or t itself where dtype is None or t is not a Tensor."""
    return t if dtype is None or not isinstance(t, torch.Tensor) else t.to(dtype)


def _autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs nn.LSTM in for input x, or None where autocast is off (or leaves
    it alone: autocast does not cast float64)."""
    if not torch._C._is_any_autocast_enabled():  # the fast way out (nn.LSTM's own check)
        return None
    kind = x.device.type
    if not torch.is_autocast_enabled(kind) or torch.float64 in (x.dtype, weight.dtype) or (
            not x.is_floating_point()):
        return None
    return torch.get_autocast_dtype(kind)


def _describe(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
