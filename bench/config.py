"""Sizes and knobs of a benchmark run (full and ``--quick``), and the run's shared context."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mmfs.testing.models import REAL_REPO_ID, make_synthetic_model, populate_hub_root

MiB = 1 << 20
GiB = 1 << 30

SYNTHETIC_REPO = "bench/synthetic"
BIGFILE_REPO = "bench/bigfile"
BIGFILE_NAME = "model-00001-of-00001.safetensors"
#: The single-shard file of the node ingest group (one cold node from a warm backend).
INGEST_REPO = "bench/ingest"


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    #: Nodes (mounts / downloaders) in the cluster cold start.
    nodes: int
    #: The test hub's aggregate bandwidth cap, bytes/s: the "internet" of scenario 1 and 2.
    hub_rate: float
    #: Synthetic multi-shard model of scenario 1.
    synthetic_bytes: int
    synthetic_shards: int
    #: One big single-shard safetensors file: scenarios 2 to 5.
    bigfile_bytes: int
    #: The node ingest group's single-shard file (issue 8: 512 MiB).
    ingest_bytes: int
    repeats: int
    random_reads: int
    #: Reader threads per node (files read at once), as a loader reading shards in parallel.
    reader_threads: int
    #: mmfs node daemon: disk cache and memory cache sizes.
    node_cache: int
    node_memory: int
    #: backend: memory tier size.
    backend_memory: int
    #: Seconds py-spy records a daemon (0: no profile).
    profile_seconds: float
    #: Run the "mmfs backend as HF_ENDPOINT" variant of scenario 1.
    backend_endpoint_variant: bool = True

    @classmethod
    def full(cls) -> "BenchConfig":
        return cls(quick=False, nodes=8, hub_rate=200e6, synthetic_bytes=1 * GiB, synthetic_shards=4,
                   bigfile_bytes=2 * GiB, ingest_bytes=512 * MiB, repeats=3, random_reads=500, reader_threads=4,
                   node_cache=8 * GiB, node_memory=256 * MiB, backend_memory=3 * GiB, profile_seconds=8)

    @classmethod
    def quick_mode(cls) -> "BenchConfig":
        return cls(quick=True, nodes=4, hub_rate=200e6, synthetic_bytes=96 * MiB, synthetic_shards=3,
                   bigfile_bytes=192 * MiB, ingest_bytes=64 * MiB, repeats=1, random_reads=100, reader_threads=4,
                   node_cache=1 * GiB, node_memory=64 * MiB, backend_memory=512 * MiB, profile_seconds=0)

    def with_overrides(self, **kw: Any) -> "BenchConfig":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Models:
    """The repos laid out under the hub root, and their sizes."""

    root: Path
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def synthetic(self) -> str:
        return SYNTHETIC_REPO

    @property
    def real(self) -> str:
        return REAL_REPO_ID

    @property
    def bigfile(self) -> str:
        return BIGFILE_REPO

    @property
    def ingest(self) -> str:
        return INGEST_REPO

    def path(self, repo_id: str) -> Path:
        return self.root / repo_id

    def bigfile_path(self) -> Path:
        return self.root / BIGFILE_REPO / BIGFILE_NAME

    def ingest_path(self) -> Path:
        return self.root / INGEST_REPO / BIGFILE_NAME


def repo_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in repo.rglob("*") if p.is_file() and ".hub" not in p.parts)


#: The repos each scenario group reads (the others are not written for a run without that group).
GROUP_REPOS = {"cold_start": (SYNTHETIC_REPO, REAL_REPO_ID), "first_tensor": (BIGFILE_REPO, REAL_REPO_ID),
               "reads": (BIGFILE_REPO,), "ingest": (INGEST_REPO,), "sharing": (SYNTHETIC_REPO,), "scale": (),
               "replicas": (),
               "artifacts": (REAL_REPO_ID,)}  # its own hub and model (bench/replicas.py)


def prepare_models(root: Path, cfg: BenchConfig, groups: list[str] | None = None) -> Models:
    """Write the synthetic repos (deterministic, skipped when already there) and the real model:
    those the scenario ``groups`` read (default: all)."""
    wanted = {repo for group in (groups or GROUP_REPOS) for repo in GROUP_REPOS[group]}
    populate_hub_root(root, include_real=REAL_REPO_ID in wanted)
    models = Models(root)
    for repo, size, shards, seed in ((SYNTHETIC_REPO, cfg.synthetic_bytes, cfg.synthetic_shards, 1),
                                     (BIGFILE_REPO, cfg.bigfile_bytes, 1, 2),
                                     (INGEST_REPO, cfg.ingest_bytes, 1, 3)):
        if repo not in wanted:
            continue
        path = root / repo
        marker = path / ".hub" / "bench-params"
        params = f"{size} {shards} {seed}"
        if not (marker.exists() and marker.read_text() == params):
            if path.exists():
                import shutil

                shutil.rmtree(path)
            make_synthetic_model(path, size, shards, seed)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(params)
    for repo in (SYNTHETIC_REPO, REAL_REPO_ID, BIGFILE_REPO, INGEST_REPO):
        if repo in wanted:
            models.sizes[repo] = repo_bytes(root / repo)
    return models
