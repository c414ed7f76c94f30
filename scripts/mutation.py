"""Mutation testing for the integrity, access and error-mapping code: break it on purpose,
run the tests that should notice, report what survived (docs/mutation.md).

    python scripts/mutation.py                 # the curated mutations (each names its tests)
    python scripts/mutation.py --auto mmfs/errors.py --tests tests/test_hub_realism.py
                                               # every comparison / boolean flip in a module
    python scripts/mutation.py --list          # what would run

Why our own runner and not mutmut: the tests that matter here run the code in child
processes (``mmfs mount``, ``mmfs-backend serve``) that import it from the source tree, which
mutmut's copied ``mutants/`` tree and in-process trampolines do not reach. So a mutant is
written over the real file, the tests run against the tree, and the file is put back
(also on ^C). Run it on a tree with no uncommitted change to the files it mutates.
A mutant is *killed* when the tests fail, *survives* when they pass; each run is bounded
by ``--timeout`` (a hang counts as killed: a reader that never returns is noticed).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or "file -k expr" selections


MUTATIONS = [
    # -- error mapping ------------------------------------------------------------------------
    Mutation("status before X-Error-Code", "mmfs/errors.py",
             "    if code in _BY_CODE:\n        return _BY_CODE[code](message)\n    if status == 400:",
             "    if status in (401, 403):\n        return AccessDenied(message)\n"
             "    if code in _BY_CODE:\n        return _BY_CODE[code](message)\n    if status == 400:",
             ("tests/test_hub_realism.py",)),
    Mutation("Retry-After ignored", "mmfs/remote/_http.py",
             "wait = max(delay * random.uniform(0.8, 1.2), asked)", "wait = delay * random.uniform(0.8, 1.2)",
             ("tests/test_hub_realism.py::test_a_rate_limit_is_waited_out_as_retry_after_asks",)),
    # -- access at the backend ----------------------------------------------------------------
    Mutation("caller answers cached forever", "backend_server/access.py",
             "if cached is not None and time.monotonic() - cached[1] < self.caller_ttl:",
             "if cached is not None:",
             ("tests/test_backend.py::test_a_revoked_token_stops_reading_cached_bytes_within_the_access_ttl",)),
    Mutation("the backend's own token is a bypass", "backend_server/access.py",
             "return self._refusal(await self._head(repo, commit, path, None)) or OPEN",
             "return self._refusal(await self._head(repo, commit, path, f\"Bearer {self._token}\" "
             "if self._token else None)) or OPEN",
             ("tests/test_backend.py::test_the_backends_own_token_is_for_warming_not_a_bypass",)),
    Mutation("gated metadata checked like content", "backend_server/access.py",
             "if kind == OPEN or (kind == GATED and not content):", "if kind == OPEN:",
             ("tests/test_backend.py::test_gated_repo_needs_the_callers_own_access",)),
    Mutation("private listings shown to anyone", "backend_server/access.py",
             "if kind == OPEN or (kind == GATED and not content):", "if kind == OPEN or not content:",
             ("tests/test_backend.py::test_private_listings_are_checked_even_when_cached",)),
    Mutation("a codeless 404 counts as access", "backend_server/access.py",
             "return None if code in _VISIBLE_404 else PRIVATE", "return None",
             ("tests/test_access_404.py",)),
    Mutation("no admin token needed", "backend_server/app.py",
             "        check_admin(self.admin_token, request.header(ADMIN_HEADER))\n        repo = _repo(",
             "        repo = _repo(",
             ("tests/test_backend.py::test_admin_actions_need_the_admin_token",)),
    Mutation("restricted chunks through the NIXL pool", "backend_server/app.py",
             "await self._chunk(request, s[3:], held, open_only=True)", "await self._chunk(request, s[3:], held)",
             ("tests/test_nixl.py::test_restricted_bytes_never_enter_the_shared_pool",)),
    Mutation("restricted chunks redirected to peers", "mmfs/peer_server.py",
             "        if not self.shareable(key.content_id):  # restricted (or unknown): as if not held",
             "        if False:",
             ("tests/test_peers.py::test_restricted_content_never_goes_through_peers",)),
    # -- access on the node ---------------------------------------------------------------------
    Mutation("no access check at open", "mmfs/vfs.py",
             "            await self._bounded(f\"access to {node.repo}\", self.gate.check, source, auth)\n",
             "            pass\n",
             ("tests/test_mount_backend.py::test_each_volume_token_gets_its_own_answer_on_one_mount",)),
    Mutation("node access answers cached forever", "mmfs/access.py",
             "if answer is None or time.monotonic() - answer[1] >= self.ttl:", "if answer is None:",
             ("tests/test_mount_backend.py::test_each_volume_token_gets_its_own_answer_on_one_mount",)),
    Mutation("a refused shared fetch fails every waiter", "mmfs/engine.py",
             "            if auth is None or _solo.get() is not None:\n                raise",
             "            if True:\n                raise",
             ("tests/test_engine.py::test_a_token_revoked_during_a_shared_fetch_fails_only_its_owner",)),
    # -- versions, tiers, readahead -------------------------------------------------------------
    Mutation("memory tier never evicts", "mmfs/tiers/memory.py",
             "        while self._used > self._limit:", "        while False:",
             ("tests/test_backend.py::test_memory_and_disk_tiers_keep_their_bounds_and_the_memory_ttl",)),
    Mutation("--disk-cache not wired", "backend_server/cli.py",
             "disk_limit = args.disk_cache or int(", "disk_limit = 0 or int(",
             ("tests/test_backend.py::test_memory_and_disk_tiers_keep_their_bounds_and_the_memory_ttl",)),
    Mutation("mount readahead not set", "mmfs/daemon.py",
             "mountutil.set_read_ahead(mountpoint, options.read_ahead)", "None",
             ("tests/test_mount.py::test_the_mount_sets_its_readahead",)),
    # -- integrity ------------------------------------------------------------------------------
    Mutation("chunk map check always passes", "mmfs/chunkmap.py",
             "    def matches(self, index: int, digests: bytes) -> bool:\n",
             "    def matches(self, index: int, digests: bytes) -> bool:\n        return True\n",
             ("tests/test_backend.py::test_a_node_checks_every_chunk_it_gets_over_plain_http",
              "tests/test_nixl.py::test_corrupted_bytes_are_still_an_error",
              "tests/test_peers.py::test_a_peer_serving_corrupt_bytes_is_caught_reported_and_avoided")),
]


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[bool, float]:
    """``(passed, seconds)``; a run past ``timeout`` counts as failed."""
    args = [a for t in tests for a in t.split()]
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([python(), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        return done.returncode == 0, time.monotonic() - started
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started


def apply(mutation: Mutation, timeout: float) -> str:
    path = ROOT / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return "stale (the code it mutates changed: update scripts/mutation.py)"
    try:
        path.write_text(original.replace(mutation.old, mutation.new))
        passed, seconds = run_tests(mutation.tests, timeout)
    finally:
        path.write_text(original)
    return f"{'SURVIVED' if passed else 'killed'} ({seconds:.0f} s)"


def auto_mutations(module: str, tests: tuple[str, ...]) -> list[Mutation]:
    """One mutant per comparison operator, boolean constant and ``not`` in ``module``."""
    source = (ROOT / module).read_text()
    lines = source.splitlines(keepends=True)
    flips = {ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Lt: ("<", ">="), ast.GtE: (">=", "<"),
             ast.Gt: (">", "<="), ast.LtE: ("<=", ">"), ast.In: (" in ", " not in ")}
    found: list[Mutation] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in flips:
            old_op, new_op = flips[type(node.ops[0])]
            line = lines[node.lineno - 1]
            if line.count(old_op) == 1 and source.count(line) == 1:
                found.append(Mutation(f"{module}:{node.lineno} {old_op.strip()} -> {new_op.strip()}", module, line,
                                      line.replace(old_op, new_op), tests))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            line = lines[node.lineno - 1]
            word = str(node.value)
            if line.count(word) == 1 and source.count(line) == 1:
                found.append(Mutation(f"{module}:{node.lineno} {word} -> {not node.value}", module, line,
                                      line.replace(word, str(not node.value)), tests))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--auto", metavar="MODULE", help="generate mutants of MODULE instead of the curated list")
    parser.add_argument("--tests", nargs="+", default=[], help="with --auto: the tests to run against each")
    parser.add_argument("--only", metavar="TEXT", help="curated mutations whose name contains TEXT")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (default 300)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args()
    if args.auto:
        if not args.tests:
            parser.error("--auto needs --tests")
        mutations = auto_mutations(args.auto, tuple(args.tests))
    else:
        mutations = [m for m in MUTATIONS if not args.only or args.only in m.name]
    survived = 0
    for mutation in mutations:
        if args.list:
            print(f"{mutation.name}: {mutation.path} -> {' '.join(mutation.tests)}")
            continue
        outcome = apply(mutation, args.timeout)
        survived += outcome.startswith(("SURVIVED", "stale"))
        print(f"{outcome:28} {mutation.name}", flush=True)
    if not args.list:
        print(f"{len(mutations) - survived} of {len(mutations)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
