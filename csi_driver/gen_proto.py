"""Regenerate (or check) the committed gRPC stubs from ``csi.proto``.

The stubs ``csi_pb2.py`` and ``csi_pb2_grpc.py`` are committed so that the installed
package needs no code generator at run time (grpcio-tools is a test extra only)::

    python -m csi_driver.gen_proto          # rewrite the stubs
    python -m csi_driver.gen_proto --check  # exit 1 if they differ from a fresh run

tests/test_csi_proto.py runs the check, so an edit of the proto without regenerating
fails the suite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
OUTPUTS = ("csi_pb2.py", "csi_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc on ``csi_driver/csi.proto`` with *out_dir* as the output root."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PACKAGE_DIR / "csi.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on csi_driver/csi.proto")


def stale_outputs() -> list[str]:
    """Names of committed stubs that differ from a fresh generation (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in OUTPUTS:
            fresh = (Path(tmp) / "csi_driver" / name).read_bytes()
            committed = PACKAGE_DIR / name
            if not committed.exists() or committed.read_bytes() != fresh:
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csi_driver.gen_proto", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_outputs()
        if stale:
            print(f"stale: {', '.join(stale)}; run python -m csi_driver.gen_proto", file=sys.stderr)
            return 1
        print("stubs are current")
        return 0
    generate(ROOT)
    print(f"wrote {', '.join(OUTPUTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
