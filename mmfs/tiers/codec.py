"""How a chunk is stored in the shared cold tier: a small header, then raw or zstd bytes.

Model weights are mostly 16-bit floats (bf16, fp16). Their high byte (sign, exponent,
top of the mantissa) repeats a lot; their low byte is close to noise. Interleaved, the
noise hides the pattern from zstd; split into a plane of low bytes and a plane of high
bytes (*byte grouping*, stride 2) zstd finds it: on a bf16 copy of a real model the issue
measured 0.71 × with grouping against 0.78 × without. fp32 weights group by 4.

The stride is chosen per chunk from a sample (:func:`choose`): text files (configs,
tokenizers) compress best ungrouped, weights grouped, and data that does not compress is
stored raw, so reading it costs no decompression. The header names what was done, so
any reader decodes any object whatever its own ``--cold-compression``::

    magic "mmfsobj1" | codec (0 raw, 1 zstd) | stride (1, 2, 4) | 6 bytes zero | raw length (u64, BE)
"""

from __future__ import annotations

import struct
import threading
from typing import Literal

import numpy as np
import zstandard

HEADER = struct.Struct(">8sBB6xQ")
MAGIC = b"mmfsobj1"
RAW, ZSTD = 0, 1
STRIDES = (1, 2, 4)
#: zstd level. Measured on the bf16 copy of all-MiniLM-L6-v2 (grouped, 4 MiB chunks): level 1
#: stored 0.685 × at 3.3 CPU-s/GB, level 3 (zstd's default) 0.710 × at 10.5 CPU-s/GB.
LEVEL = 1
#: Bytes of a chunk compressed with each stride to choose one.
SAMPLE = 128 << 10
#: Kept compressed only when it saves at least this fraction (else raw: free to read).
MIN_SAVING = 0.03

Compression = Literal["zstd", "none"]
_local = threading.local()


class CorruptObject(ValueError):
    """An object whose header or payload cannot be decoded."""


def _compressor() -> zstandard.ZstdCompressor:
    found = getattr(_local, "compressor", None)
    if found is None:
        found = _local.compressor = zstandard.ZstdCompressor(level=LEVEL)
    return found


def _decompressor() -> zstandard.ZstdDecompressor:
    found = getattr(_local, "decompressor", None)
    if found is None:
        found = _local.decompressor = zstandard.ZstdDecompressor()
    return found


def group(data: bytes | bytearray | memoryview, stride: int) -> bytes:
    """Byte ``i`` of every ``stride``-byte word together, plane after plane; a tail shorter
    than a word stays at the end as it was. (numpy: a strided slice of ``bytes`` in Python
    moved 60 MB/s here, slower than zstd itself.)"""
    view = memoryview(data).cast("B")
    if stride == 1:
        return bytes(view)
    whole = len(view) - len(view) % stride
    planes = np.frombuffer(view[:whole], dtype=np.uint8).reshape(-1, stride).T
    return planes.tobytes() + bytes(view[whole:])


def ungroup(data: bytes, stride: int) -> bytes:
    """The inverse of :func:`group`."""
    if stride == 1:
        return bytes(data)
    plane = len(data) // stride
    source = np.frombuffer(data, dtype=np.uint8, count=plane * stride)
    words = np.empty((plane, stride), dtype=np.uint8)
    for i in range(stride):  # column by column: measured faster here than a transposed copy
        words[:, i] = source[i * plane:(i + 1) * plane]
    return words.tobytes() + bytes(data[plane * stride:])


def choose(data: bytes | bytearray | memoryview) -> int | None:
    """The stride that compresses a sample from the middle of ``data`` best, or ``None``
    when no stride saves :data:`MIN_SAVING` (store it raw)."""
    middle = (len(data) // 2) & ~7
    sample = bytes(memoryview(data)[max(0, middle - SAMPLE // 2):middle + SAMPLE // 2])
    if not sample:
        return None
    sizes = {stride: len(_compressor().compress(group(sample, stride))) for stride in STRIDES}
    stride = min(sizes, key=lambda s: (sizes[s], s))
    return stride if sizes[stride] <= len(sample) * (1 - MIN_SAVING) else None


def encode(data: bytes | bytearray | memoryview, compression: Compression) -> bytes:
    """The stored form of a chunk (CPU-heavy with ``zstd``: run it in a worker thread)."""
    stride = choose(data) if compression == "zstd" else None
    if stride is None:
        return HEADER.pack(MAGIC, RAW, 1, len(data)) + bytes(data)
    return HEADER.pack(MAGIC, ZSTD, stride, len(data)) + _compressor().compress(group(data, stride))


def decode(blob: bytes) -> bytes:
    """The chunk's bytes from its stored form; :class:`CorruptObject` when it is not one."""
    if len(blob) < HEADER.size:
        raise CorruptObject("shorter than its header")
    magic, codec, stride, size = HEADER.unpack_from(blob)
    if magic != MAGIC or codec not in (RAW, ZSTD) or stride not in STRIDES:
        raise CorruptObject("not a chunk object (bad header)")
    payload = memoryview(blob)[HEADER.size:]
    if codec == RAW:
        data = bytes(payload)
    else:
        try:
            data = ungroup(_decompressor().decompress(payload, max_output_size=size), stride)
        except zstandard.ZstdError as exc:
            raise CorruptObject(f"zstd: {exc}") from exc
    if len(data) != size:
        raise CorruptObject(f"{len(data)} bytes decoded, header says {size}")
    return data


__all__ = ["Compression", "CorruptObject", "choose", "decode", "encode", "group", "ungroup"]
