"""Human sizes on the command line: ``10GiB``, ``512MB``, ``4M``, ``100MB/s``."""

from __future__ import annotations

import argparse
import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``10GiB``-style sizes into bytes; raise ``ValueError`` naming the problem."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit such as 512MiB, 10GiB or 2GB")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_rate(text: str) -> int:
    """Parse a bandwidth such as ``100MB/s`` (the ``/s`` is optional) into bytes per second."""
    return parse_size(text[:-2] if text.endswith("/s") else text)


def size_argument(text: str) -> int:
    """:func:`parse_size` as an ``argparse`` type: a bad size is a usage error naming it."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def rate_argument(text: str) -> int:
    """:func:`parse_rate` as an ``argparse`` type."""
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: float) -> str:
    """Render a byte count for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
