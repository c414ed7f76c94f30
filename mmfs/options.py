"""Checks of command-line options shared by ``mmfs``, ``mmfs-backend`` and ``mmfs-csi``.

Every option is checked when the command starts, never at the first read: a value that
cannot work (``--chunk-size 1``, ``--backend 127.0.0.1:3000``, ``--jobs 0``) would
otherwise start a daemon whose every request fails, with the cause in a debug log. Each
check here is an ``argparse`` type: a bad value ends the command with exit status 2 and
one line naming the option and the value (argparse adds the option name), no traceback.
Values that depend on other options are checked by the command itself with the same
wording (:func:`usage_error`).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from importlib import metadata
from typing import Callable
from urllib.parse import urlsplit

from .sizes import parse_size

#: Smallest chunk a node or backend cuts files into: one verification block
#: (:data:`mmfs.chunkmap.BLOCK_SIZE`); smaller chunks only multiply requests.
MIN_CHUNK = 64 << 10
#: Kernel readahead of a mount: from one page to what the kernel's bdi accepts usefully.
MIN_READ_AHEAD = 4 << 10
MAX_READ_AHEAD = 1 << 30

_DNS_LABELS = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")


class OptionError(argparse.ArgumentTypeError):
    """A value refused; argparse prints ``argument --x: <message>`` and exits 2."""


def usage_error(prog: str, message: str) -> int:
    """Print ``<prog>: error: <message>`` as argparse does, and return its exit status (2)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def size_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """A size (``10GiB``-style) from ``low`` to ``high`` bytes."""

    def check(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
        if value < low or (high is not None and value > high):
            bound = f"from {_exact(low)} to {_exact(high)}" if high is not None else f"at least {_exact(low)}"
            raise OptionError(f"{text!r} is out of range: must be {bound}")
        return value

    return check


def _exact(n: int) -> str:
    """A bound as it would be typed: ``64KiB``, ``1GiB``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"


def chunk_size(text: str) -> int:
    """A chunk size from :data:`MIN_CHUNK` to the largest a manifest may carry."""
    from .manifest import MAX_CHUNK_SIZE  # here: mmfs-csi uses this module without the data path

    return size_between(MIN_CHUNK, MAX_CHUNK_SIZE)(text)


read_ahead = size_between(MIN_READ_AHEAD, MAX_READ_AHEAD)


def int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high`` (ASCII digits only: ``'²'`` is not a number)."""

    def check(text: str) -> int:
        stripped = text.strip()
        if not re.fullmatch(r"[+-]?[0-9]+", stripped):
            raise OptionError(f"invalid whole number {text!r}")
        value = int(stripped)
        if value < low or (high is not None and value > high):
            raise OptionError(f"{value} is out of range: must be " +
                              (f"from {low} to {high}" if high is not None else f"at least {low}"))
        return value

    return check


positive_int = int_between(1)


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"invalid number of seconds {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise OptionError(f"seconds must be a positive number, not {text!r}")
    return value


def seconds_or_zero(text: str) -> float:
    """A finite number of seconds, 0 included (``--retain 0``: at once)."""
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"invalid number of seconds {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise OptionError(f"seconds must be 0 or more, not {text!r}")
    return value


def model_ref(text: str) -> tuple:
    """``huggingface/<org>/<name>@<ref>`` as ``(RepoRef, revision)``."""
    from .errors import InvalidName
    from .refwatch import parse_ref_key

    try:
        return parse_ref_key(text)
    except InvalidName as exc:
        raise OptionError(str(exc)) from None


def http_url(text: str) -> str:
    """An ``http://`` or ``https://`` URL with a host (and a valid port, if any), returned
    without a trailing slash. ``127.0.0.1:3000`` (no scheme) and ``htp:/x`` are refused here
    rather than failing every request later."""
    value = text.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise OptionError(f"invalid URL {text!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise OptionError(f"invalid URL {text!r}: the port must be a number from 0 to 65535") from None
    if not parts.hostname:
        raise OptionError(f"invalid URL {text!r}: no host")
    if parts.query or parts.fragment:
        raise OptionError(f"invalid URL {text!r}: no query or fragment expected")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise OptionError(f"invalid URL {text!r}: spaces or control characters")
    return value.rstrip("/")


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:3000``, ``:3000`` for every address; port 0 picks a free one)."""
    host, sep, port = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise OptionError(f"invalid address {text!r}: expected HOST:PORT such as 0.0.0.0:3000")
    return host.strip("[]") or "0.0.0.0", int(port)


def absolute_path(text: str) -> str:
    """An absolute path (daemons must not depend on the directory they were started in)."""
    if not text.startswith("/") or "\0" in text:
        raise OptionError(f"{text!r} is not an absolute path")
    return text


def dns_name(text: str) -> str:
    """A DNS-like name of at most 63 characters, letters or digits at both ends (CSI driver names)."""
    if not _DNS_LABELS.fullmatch(text):
        raise OptionError(f"invalid name {text!r}: at most 63 letters, digits, '-' and '.', "
                          "beginning and ending with a letter or digit")
    return text


def non_empty(text: str) -> str:
    if not text.strip():
        raise OptionError("must not be empty")
    return text


def package_version() -> str:
    """The installed mmfs distribution's version (``--version`` of every command)."""
    try:
        return metadata.version("mmfs")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"{parser.prog} {package_version()}")
