"""``mmfs mount`` that gives up CAP_SYS_ADMIN once mounted, for the passthrough fallback test.

    python -m mmfs.testing.nocap mount MOUNTPOINT [options…]

Mounting needs the capability (or fusermount3); registering a passthrough backing file
needs it too. This runs the ordinary ``mmfs`` command, but drops CAP_SYS_ADMIN from the
effective set of the daemon's main thread (where every FUSE handler runs) when the kernel's
INIT arrives, as a daemon in a container without that privilege would be.
"""

from __future__ import annotations

import ctypes
import sys

CAP_SYS_ADMIN = 21
_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_effective(capability: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[capability // 32].effective &= ~(1 << (capability % 32))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def main() -> int:
    from mmfs import cli, fuse_ops

    original = fuse_ops.Operations.init

    def init(self: fuse_ops.Operations) -> None:
        drop_effective(CAP_SYS_ADMIN)
        original(self)

    fuse_ops.Operations.init = init  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
