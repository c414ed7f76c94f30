"""``mmfs-csi``: the mmfs CSI node plugin.

    mmfs-csi --endpoint unix:///csi/csi.sock --node-id $(NODE_NAME) \\
        --mount-root /var/lib/mmfs/models --state-dir /var/lib/mmfs-csi

Serves CSI Identity and Node over the unix socket until SIGTERM/SIGINT. Published bind
mounts are left in place on exit (pods keep reading); the next start reloads them from
the state dir and re-binds any that went stale.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from mmfs import options

from .node import Config, NodeDriver
from .server import make_server, socket_path, vendor_version

log = logging.getLogger("csi_driver")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfs-csi", description="mmfs CSI node plugin")
    options.add_version(p)
    p.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"), help="unix:///path/csi.sock (env CSI_ENDPOINT)")
    p.add_argument("--node-id", default=os.environ.get("NODE_ID"), help="this node's name (env NODE_ID); required")
    p.add_argument("--mount-root", type=options.absolute_path, default="/var/lib/mmfs/models", help="where the mmfs FUSE daemon is mounted")
    p.add_argument("--state-dir", type=options.absolute_path, default="/var/lib/mmfs-csi", help="record of published targets (not the socket dir)")
    p.add_argument("--kubelet-dir", type=options.absolute_path, default="/var/lib/kubelet",
                   help="kubelet's root dir: only targets under <dir>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount are accepted")
    p.add_argument("--driver-name", type=options.dns_name, default="mmfs.csi.dynamo.io", help="CSI driver name (must match the CSIDriver object)")
    p.add_argument("--read-ahead-kb", type=options.int_between(0, 1 << 20), default=16384, help="readahead for the mount's FUSE device; 0 leaves it alone")
    p.add_argument("--rebind-interval", type=options.seconds, default=5.0, help="seconds between checks for stale targets")
    p.add_argument("--fs-timeout", type=options.seconds, default=5.0, help="bound on any stat/readlink into the mount")
    p.add_argument("--prefetch-command", type=options.non_empty, default="mmfs", help="command run as '<cmd> prefetch …' for prefetch: \"true\"")
    p.add_argument("--token-dir", type=options.absolute_path, default="/var/lib/mmfs/tokens",
                   help="where per-volume tokens (nodePublishSecretRef) are written; the mmfs mount's --token-dir")
    p.add_argument("--workers", type=options.int_between(1, 1024), default=8, help="gRPC worker threads")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.node_id:
        parser.error("--node-id (or NODE_ID) is required")
    try:
        socket_path(args.endpoint)
    except ValueError as exc:
        parser.error(f"--endpoint: {exc}")
    config = Config(
        node_id=args.node_id,
        mount_root=args.mount_root,
        state_dir=args.state_dir,
        driver_name=args.driver_name,
        read_ahead_kb=args.read_ahead_kb,
        rebind_interval=args.rebind_interval,
        fs_timeout=args.fs_timeout,
        prefetch_command=args.prefetch_command,
        kubelet_dir=args.kubelet_dir,
        token_dir=args.token_dir,
    )
    driver = NodeDriver(config)
    log.info("%d published target(s) loaded from %s", len(driver.state.all()), args.state_dir)
    server = make_server(driver, args.endpoint, args.workers)
    server.start()
    log.info("mmfs-csi %s serving %s on %s for node %s", vendor_version(), args.driver_name, args.endpoint, args.node_id)
    driver.run_background()  # first pass right away: re-binds what went stale while we were down

    stopped = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping (published targets stay mounted)", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    driver.stop()
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
