"""``mmfs mount`` as on a kernel or libfuse that does not offer passthrough at INIT.

    python -m mmfs.testing.noinit mount MOUNTPOINT [options…]

For the ``--passthrough on`` test: the patched pyfuse3 reports that the kernel's INIT did
not grant the passthrough capability, as on Linux < 6.9 or with libfuse < 3.17.
"""

from __future__ import annotations

import sys


def main() -> int:
    import pyfuse3

    from mmfs import cli

    pyfuse3.passthrough_enabled = lambda: False  # type: ignore[attr-defined]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
