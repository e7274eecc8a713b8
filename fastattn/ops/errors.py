"""The exceptions fastattn raises for bad input.

torch's ops reject bad input with ``RuntimeError``; Python convention (and fastattn's messages)
say ``ValueError`` / ``TypeError``. Each class here is both, so a drop-in caller's
``except RuntimeError`` keeps working and ``except ValueError`` / ``except TypeError`` too.
"""


class FastattnValueError(ValueError, RuntimeError):
    """An argument has the right type but a wrong value, shape, device or length."""


class FastattnTypeError(TypeError, RuntimeError):
    """An argument has the wrong Python type or dtype."""


class FastattnDtypeError(FastattnTypeError, ValueError):
    """A tensor's dtype differs from the module's weights: nn.LSTM raises ``ValueError`` for it,
    fastattn's convention says ``TypeError``; this is both (and ``RuntimeError``)."""


class FastattnShapeAssertionError(FastattnValueError, AssertionError):
    """A wrong shape or size that the torch module fastattn replaces rejects with ``assert``
    (nn.MultiheadAttention's checks): ``ValueError`` by fastattn's convention, ``AssertionError``
    as in torch (and ``RuntimeError``)."""


class FastattnDtypeAssertionError(FastattnTypeError, AssertionError):
    """A wrong dtype that the torch module rejects with ``assert``: ``TypeError``,
    ``AssertionError`` and ``RuntimeError``."""


class FastattnIndexError(FastattnValueError, IndexError):
    """A tensor lacks a dim that torch's op indexes, and torch lets that ``IndexError`` through
    (a 0-D or 1-D attn_mask on its CPU flash path, enable_gqa with a 2-D input): ``ValueError``
    by fastattn's convention, ``IndexError`` as in torch (and ``RuntimeError``)."""


class FastattnNotImplementedError(FastattnTypeError, NotImplementedError):
    """A dtype torch's op has no kernel for (complex, float8), which torch rejects with
    ``NotImplementedError``: ``TypeError`` by fastattn's convention, ``NotImplementedError`` as in
    torch (and ``RuntimeError``)."""
