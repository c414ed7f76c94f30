"""``mmfs mount`` whose peer server sends every chunk with one byte flipped.

    python -m mmfs.testing.corrupt_peer mount MOUNTPOINT --backend URL --peer-listen HOST:PORT …

For the test that a peer serving wrong bytes is caught by the chunk map, reported and
avoided. Production never imports this module: only ``python -m`` reaches it.
"""

from __future__ import annotations

import sys

from ..tiers.base import Chunk


def _flipped(self: object, chunk: Chunk) -> bytes:
    data = bytearray(chunk.data)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def main() -> int:
    from mmfs import cli
    from mmfs.peer_server import PeerServer

    PeerServer._payload = _flipped  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
