"""argparse value types shared by every command's flags."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float flag: "nan" and "inf" parse as floats, then slip past every range check (nan < 0 is False) and
    fail later as a traceback or a wait that never ends; refused here as a usage error instead."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value
