"""Modules: drop-in replacements for torch.nn attention and LSTM modules, and convert()."""

from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.convert import convert

__all__ = ["MultiheadAttention", "convert"]
