"""Drop-in modules served by fastattn's fused ops."""

from fastattn.nn.lstm import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell"]
