"""Modules: drop-in replacements for torch.nn attention and LSTM modules, and convert()."""

from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.convert import convert
from fastattn.nn.lstm import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "MultiheadAttention", "convert"]
