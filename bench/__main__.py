"""``python -m bench [--quick] [--out DIR] [--only GROUP]``: run the scenarios, write results and plots.

``python -m bench simulate [...]``: the cluster simulator alone (:mod:`bench.simulate`).

Starts real processes on loopback: the test hub (rate-capped, standing in for the
internet), the mmfs backend and N mmfs mounts (standing in for N nodes), plus the
baselines (``snapshot_download`` processes, the download-then-read recipe, native and
``O_DIRECT`` reads, ``curl`` from the backend, a loopback socket). Writes ``results.json``, ``RESULTS.md`` and PNG plots into ``--out``; with
``--publish`` also ``bench/RESULTS.md`` and ``bench/plots/*.png`` (the committed report).

Benchmarks report, they do not assert: the exit status is 0 unless the benchmark itself
broke (a scenario raised); a part of mmfs that is missing makes its scenarios report
"not available".
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from mmfs.sizes import rate_argument, size_argument

from .config import BenchConfig, prepare_models
from .context import Context
from .harness import Harness, MmfsTools, Unavailable, drop_caches, http_json, machine_info, rmtree
from .report import write_all
from .results import Scenario

BENCH_DIR = Path(__file__).resolve().parent
#: Scenario groups in the order they run; each is a module of this package with ``run(ctx)``.
SCENARIOS = ("ingest", "cold_start", "first_tensor", "reads", "sharing", "scale", "replicas", "artifacts")


def _git_commit() -> str:
    """HEAD, and whether mmfs/ or backend_server/ differ from it (others edit the tree meanwhile)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=BENCH_DIR.parent,
                              timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "mmfs", "backend_server")
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return head + (" (mmfs/ or backend_server/ had uncommitted changes)" if dirty else "")


def _prewarm_hub(ctx: Context) -> None:
    """Let the hub hash every repo (it caches hashes) and put its files in the page cache."""
    for repo in ctx.models.sizes:
        http_json(f"{ctx.hub.url}/api/models/{repo}", timeout=300)
        for path in sorted(ctx.models.path(repo).rglob("*")):
            if path.is_file():
                with open(path, "rb", buffering=0) as f:
                    while f.read(16 << 20):
                        pass


def _run_scenario(name: str, ctx: Context) -> list[Scenario]:
    if name not in SCENARIOS:
        raise ValueError(name)
    import importlib

    return importlib.import_module(f".{name}", __package__).run(ctx)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["simulate"]:
        from .simulate import main as simulate

        return simulate(args_in[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (CI smoke, < 2 min)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="where results go (default bench/out)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch space for models, caches and mounts (default: a fresh "
                             "$TMPDIR/mmfs-bench-XXXX, so concurrent runs never share one)")
    parser.add_argument("--only", action="append", choices=SCENARIOS,
                        help="run only these scenario groups (repeatable); `--only ingest`: the node ingest "
                             "group alone (one cold node from a warm backend: curl, tcp, nixl), a few minutes")
    parser.add_argument("--repeats", type=int, default=None, help="override the number of repeats")
    parser.add_argument("--nodes", type=int, default=None, help="override the number of nodes of scenario 1")
    parser.add_argument("--hub-rate", type=rate_argument, default=None, metavar="RATE",
                        help="override the hub's bandwidth cap of scenarios 1 and 2 (e.g. 100MB/s; default 200MB/s)")
    parser.add_argument("--synthetic-size", type=size_argument, default=None, metavar="SIZE",
                        help="override the synthetic model of scenario 1 (default 1GiB, quick 96MiB)")
    parser.add_argument("--bigfile-size", type=size_argument, default=None, metavar="SIZE",
                        help="override the single file of scenarios 2-5 (default 2GiB, quick 192MiB)")
    parser.add_argument("--ingest-size", type=size_argument, default=None, metavar="SIZE",
                        help="override the file of scenario 8, node ingest (default 512MiB, quick 64MiB)")
    parser.add_argument("--profile", type=float, default=None, metavar="SECONDS",
                        help="profile the read path with py-spy (default: on in full runs, off in --quick; 0: off)")
    parser.add_argument("--time-limit", type=int, default=None, metavar="SECONDS",
                        help="abort (with teardown) past this (default: 900 quick, 5400 full)")
    parser.add_argument("--keep-data", action="store_true", help="keep the generated models in --work")
    parser.add_argument("--publish", action="store_true",
                        help="also write bench/RESULTS.md and bench/plots/ (the committed report)")
    args = parser.parse_args(argv)

    cfg = (BenchConfig.quick_mode() if args.quick else BenchConfig.full()).with_overrides(
        repeats=args.repeats, nodes=args.nodes, profile_seconds=args.profile, hub_rate=args.hub_rate,
        synthetic_bytes=args.synthetic_size, bigfile_bytes=args.bigfile_size, ingest_bytes=args.ingest_size)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_start = time.monotonic()
    out = args.out.resolve()
    if args.work is None:
        work = Path(tempfile.mkdtemp(prefix="mmfs-bench-"))
    else:
        work = args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    run = {"command": command, "started": started, "machine": machine_info(), "config": cfg.to_json(),
           "commit": _git_commit(), "drop_caches": drop_caches()}
    print(f"[bench] {command}\n[bench] machine: {json.dumps(run['machine'])}", flush=True)
    tools = MmfsTools.probe()
    missing = tools.missing()
    if missing:
        print(f"[bench] note: {missing}; their scenarios will report 'not available'", flush=True)
    scenarios: list[Scenario] = []
    errors = 0
    ctx_errors: list[str] = []
    # A hung mount must not hang CI: past this, the scenario in progress fails and teardown runs.
    limit = args.time_limit or (900 if cfg.quick else 5400)

    def _too_long(signum: int, frame: object) -> None:
        raise TimeoutError(f"the benchmark ran past its time limit ({limit} s)")

    signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(limit)
    wanted = args.only or list(SCENARIOS)
    try:
        with Harness(work / "run", out / "logs", tools) as harness:
            models = prepare_models(work / "hub", cfg, wanted)
            hub = harness.start_hub(work / "hub", rate=None)
            ctx = Context(cfg, harness, work / "run", out, models, hub)
            _prewarm_hub(ctx)
            ctx.log(f"hub at {hub.url}; models: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in models.sizes.items()))
            for name in SCENARIOS:
                if name not in wanted:
                    continue
                t0 = time.monotonic()
                mark = harness.checkpoint()
                ctx.log(f"scenario group {name}")
                try:
                    got = _run_scenario(name, ctx)
                except Unavailable as err:
                    got = [Scenario(name, name).unavailable(str(err))]
                except Exception as err:  # the benchmark broke: report it, go on, exit 1
                    errors += 1
                    traceback.print_exc()
                    got = [Scenario(name, name, status="error", reason=f"{type(err).__name__}: {err}")]
                harness.cleanup_since(mark)  # leave no mount or child of a scenario behind
                for s in got:
                    s.seconds = time.monotonic() - t0
                    ctx.results[s.id] = s
                scenarios += got
                ctx.log(f"scenario group {name} done in {time.monotonic() - t0:.0f} s")
            errors += len(ctx.errors)
            ctx_errors += ctx.errors
    finally:
        signal.alarm(0)
        rmtree(work / "run")
        if not args.keep_data:
            rmtree(work)
    run["seconds"] = time.monotonic() - t_start
    end_commit = _git_commit()
    if end_commit != run["commit"]:
        run["commit"] += f"; at the end: {end_commit}"
    path = write_all(run, scenarios, out)
    print(f"[bench] wrote {path} and {out / 'results.json'} in {run['seconds']:.0f} s", flush=True)
    if args.publish and errors:
        print(f"[bench] not published: {errors} error(s) in this run ({'; '.join(ctx_errors)[:500]})", flush=True)
    elif args.publish:
        from .publish import publish

        print(f"[bench] published {publish(out, BENCH_DIR)}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
