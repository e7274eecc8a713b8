"""The two language models of the reference trainer: a small GPT and an LSTM LM.

``backend="fastattn"`` routes attention through ``fastattn.scaled_dot_product_attention`` (and,
when decoding, ``fastattn.attention_with_kv_cache`` over a paged KV cache), the recurrence
through ``fastattn.LSTM`` and the projections through ``fastattn.ops.linear.linear`` (F.linear on
fastattn's CPU GEMM where that beats torch.mm's, else F.linear); ``backend="torch"`` uses
``F.scaled_dot_product_attention`` (decoding: gathering the cache's pages, then SDPA), ``nn.LSTM``
and ``F.linear``. Both backends build identical parameters
from the same seed (same names, shapes, init order), so runs can be compared step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastattn.lm.data import VOCAB_SIZE

BACKENDS = ("fastattn", "torch")
MODELS = ("gpt", "lstm")

LSTMState = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelConfig:
    """Everything that fixes the parameter shapes; checkpoints refuse to load into another."""

    model: str = "gpt"
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4  # gpt only
    block_size: int = 128  # gpt: longest context (learned positions); lstm: training window
    dropout: float = 0.0


class PagedKVCache:
    """The GPT's decoding cache, paged as fastattn.attention_with_kv_cache reads it.

    Per layer k and v [num_blocks, n_head, block_size, head_dim]; position p of batch row b
    lives in block block_table[b, p // block_size] (int32 [B, max_blocks]), row p % block_size.
    Every row holds the same ``length`` positions (the model steps all rows together);
    ``seqlens`` is that length as the int32 [B] tensor the attention op takes.
    """

    def __init__(self, config: ModelConfig, batch: int, device: torch.device,
                 dtype: torch.dtype, block_size: int = 16):
        head_dim = config.n_embd // config.n_head
        max_blocks = -(-config.block_size // block_size)
        self.block_table = torch.arange(batch * max_blocks, dtype=torch.int32,
                                        device=device).view(batch, max_blocks)
        shape = (batch * max_blocks, config.n_head, block_size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    def advance(self, n: int) -> None:
        """Marks n more positions of every row as filled (after all layers appended them)."""
        self.length += n
        self.seqlens.fill_(self.length)

    def reset(self) -> None:
        self.advance(-self.length)


def paged_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    k_new: torch.Tensor, v_new: torch.Tensor, *, block_table: torch.Tensor, causal: bool,
) -> torch.Tensor:
    """fastattn.attention_with_kv_cache's paged call (bottom-right causal) in plain torch:
    appends k_new / v_new [B, H, L, D] into the pages, gathers every page of each row and runs
    F.scaled_dot_product_attention with a mask of the valid, causally visible positions."""
    B, H, L, _ = q.shape
    block_size = k_cache.shape[2]
    pos = torch.arange(block_table.shape[1] * block_size, device=q.device)  # [S_cap]
    blocks, rows = block_table.long()[:, pos // block_size], pos % block_size  # [B, S_cap]
    new = cache_seqlens.long()[:, None] + torch.arange(L, device=q.device)  # [B, L]
    new_blocks = block_table.long().gather(1, new // block_size)
    k_cache[new_blocks, :, new % block_size] = k_new.transpose(1, 2)
    v_cache[new_blocks, :, new % block_size] = v_new.transpose(1, 2)
    keys = k_cache[blocks, :, rows[None, :].expand_as(blocks)].transpose(1, 2)  # [B, H, S_cap, D]
    values = v_cache[blocks, :, rows[None, :].expand_as(blocks)].transpose(1, 2)
    last_visible = new if causal else (cache_seqlens.long() + L - 1)[:, None].expand(B, L)
    mask = pos[None, None, :] <= last_visible[:, :, None]  # [B, L, S_cap]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])


class BackendUnavailableError(RuntimeError):
    """--backend fastattn asked for a function or module this fastattn build lacks."""


def _fastattn_attr(name: str):
    import fastattn

    if not hasattr(fastattn, name):
        raise BackendUnavailableError(
            f"--backend fastattn needs fastattn.{name}, which this fastattn build does not "
            "provide; use --backend torch"
        )
    return getattr(fastattn, name)


def attention_function(backend: str) -> Callable[..., torch.Tensor]:
    """The scaled_dot_product_attention of the chosen backend (torch's signature)."""
    if backend == "fastattn":
        return _fastattn_attr("scaled_dot_product_attention")
    if backend == "torch":
        return F.scaled_dot_product_attention
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def linear_function(backend: str) -> Callable[..., torch.Tensor]:
    """F.linear of the chosen backend (F.linear's signature)."""
    if backend == "fastattn":
        return _fastattn_attr("ops").linear.linear
    if backend == "torch":
        return F.linear
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class Linear(nn.Linear):
    """nn.Linear whose product is the backend's linear function: the same parameters, names and
    initialization on either backend."""

    def __init__(self, in_features: int, out_features: int,
                 linear: Callable[..., torch.Tensor]):
        super().__init__(in_features, out_features)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


def cached_attention_function(backend: str) -> Callable[..., torch.Tensor]:
    """Attention over a paged KV cache of the chosen backend (attention_with_kv_cache's
    signature, as far as the GPT calls it)."""
    if backend == "fastattn":
        return _fastattn_attr("attention_with_kv_cache")
    if backend == "torch":
        return paged_attention_torch
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, sdpa: Callable[..., torch.Tensor],
                 cached_attention: Callable[..., torch.Tensor],
                 linear: Callable[..., torch.Tensor]):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(
                f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})"
            )
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, linear)
        self.proj = Linear(config.n_embd, config.n_embd, linear)
        self.sdpa = sdpa
        self.cached_attention = cached_attention

    def forward(self, x: torch.Tensor, cache: PagedKVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x [B, L, C] -> y [B, L, C]. With ``cache``, the L new positions are appended to
        layer ``layer``'s pages and attend over every cached position before them (bottom-right
        causal: the new queries are the last positions)."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            # Training: L == S, so torch's top-left causal mask is the usual one.
            y = self.sdpa(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            y = self.cached_attention(q, cache.k[layer], cache.v[layer], cache.seqlens, k, v,
                                      block_table=cache.block_table, causal=True)
        y = y.transpose(1, 2).reshape(B, L, C)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig, sdpa: Callable[..., torch.Tensor],
                 cached_attention: Callable[..., torch.Tensor],
                 linear: Callable[..., torch.Tensor]):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, sdpa, cached_attention, linear)
        self.ln_mlp = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            Linear(config.n_embd, 4 * config.n_embd, linear),
            nn.GELU(),
            Linear(4 * config.n_embd, config.n_embd, linear),
            nn.Dropout(config.dropout),
        )

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_attn(x), cache, layer)
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """A GPT-style decoder over bytes: learned positions, pre-LN blocks, tied embeddings."""

    def __init__(self, config: ModelConfig, backend: str = "fastattn"):
        super().__init__()
        self.config = config
        sdpa = attention_function(backend)
        cached_attention = cached_attention_function(backend)
        self.linear = linear_function(backend)
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, sdpa, cached_attention, self.linear) for _ in range(config.n_layer)
        )
        self.ln_final = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        # Residual projections scaled down with depth so the residual stream starts small.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_kv_cache(self, batch: int, block_size: int = 16) -> PagedKVCache:
        """An empty paged KV cache for decoding ``batch`` rows with this model."""
        weight = self.token_embedding.weight
        return PagedKVCache(self.config, batch, weight.device, weight.dtype, block_size)

    def forward(
        self, idx: torch.Tensor, cache: PagedKVCache | None = None
    ) -> tuple[torch.Tensor, PagedKVCache | None]:
        """idx int64 [B, L] -> (logits [B, L, 256], cache).

        With ``cache`` (new_kv_cache), idx holds the next L tokens of each row, after the
        cache's ``length`` positions: their keys and values are appended to it (prefill: an
        empty cache and the prompt; decoding: one token at a time).
        """
        past = 0 if cache is None else cache.length
        if past + idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"{past + idx.shape[1]} positions exceed block_size {self.config.block_size}"
            )
        positions = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.position_embedding(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(idx.shape[1])
        logits = self.linear(self.ln_final(x), self.token_embedding.weight)
        return logits, cache


class LSTMLM(nn.Module):
    """Byte embedding -> multi-layer LSTM -> linear head (tied to the embedding)."""

    def __init__(self, config: ModelConfig, backend: str = "fastattn"):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.n_embd)
        lstm_args = dict(
            input_size=config.n_embd,
            hidden_size=config.n_embd,
            num_layers=config.n_layer,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.lstm = nn.LSTM(**lstm_args)
        if backend == "fastattn":
            fastattn_lstm_class = _fastattn_attr("LSTM")
            # Built without touching the global RNG, then given torch's initial weights, so both
            # backends start from the same parameters and consume the same random numbers.
            with torch.random.fork_rng(devices=[]):
                fastattn_lstm = fastattn_lstm_class(**lstm_args)
            fastattn_lstm.load_state_dict(self.lstm.state_dict())
            self.lstm = fastattn_lstm
        elif backend != "torch":
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.ln_final = nn.LayerNorm(config.n_embd)
        self.linear = linear_function(backend)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(
        self, idx: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """idx int64 [B, L] -> (logits [B, L, 256], (h, c) each [n_layer, B, n_embd])."""
        out, state = self.lstm(self.token_embedding(idx), state)
        return self.linear(self.ln_final(out), self.token_embedding.weight), state


def build_model(config: ModelConfig, backend: str) -> nn.Module:
    if config.model == "gpt":
        return GPT(config, backend)
    if config.model == "lstm":
        return LSTMLM(config, backend)
    raise ValueError(f"model must be one of {MODELS}, got {config.model!r}")


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross entropy in nats; logits [B, L, 256], targets int64 [B, L]."""
    return F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), targets.reshape(-1))
