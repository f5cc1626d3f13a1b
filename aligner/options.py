"""Command-line number checks shared by ``aligner.train``, ``aligner.evaluate`` and ``synth``."""
from __future__ import annotations

import argparse
import math


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace, ranges: dict) -> None:
    """``parser.error`` naming the first option outside its range (NaN and infinity included),
    before anything is loaded: such values used to fail after the model loaded, or train nonsense."""
    for dest, (low, high, low_open) in ranges.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        bad = not math.isfinite(value) or value < low or (low_open and value == low) or \
            (high is not None and value > high)
        if bad:
            side = f"> {low}" if low_open else f">= {low}"
            want = side + (f" and <= {high}" if high is not None else "")
            parser.error(f"--{dest.replace('_', '-')} must be {want}, got {value}")
