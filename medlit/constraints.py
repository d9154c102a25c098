"""The ranges of medlit's numeric arguments, as types that jsonargparse checks at parse
time: ``--data.loader.batch_size=0`` or ``--model.lr=-1`` is refused naming the key,
before a tracking run is opened, instead of failing inside torch after it.

In Python they are plain ``int``/``float`` subclasses: nothing changes for a caller.
``tests/test_constraints.py`` fails on a numeric argument of a medlit class left without
one (or a reason, in its list of exemptions).
"""

from __future__ import annotations

from typing import Any

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

# [0, 1): shares of a dataset, smoothing, dropout, momentum-like coefficients.
Fraction = restricted_number_type(
    "Fraction", float, [(">=", 0), ("<", 1)], docstring="a float in [0, 1)"
)
# k-fold needs at least two folds.
Folds = restricted_number_type("Folds", int, (">=", 2), docstring="an int of at least 2")


def plain(value: Any) -> Any:
    """``value`` with every restricted number turned back into a plain ``int``/``float``
    (through lists, tuples and dicts). Parsed arguments are instances of these types; a
    checkpoint must hold only plain values, so that ``torch.load(weights_only=True)`` reads
    it anywhere, without medlit or jsonargparse installed."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


__all__ = [
    "ClosedUnitInterval",
    "Folds",
    "Fraction",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "plain",
]
