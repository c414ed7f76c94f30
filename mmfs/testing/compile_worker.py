"""A worker that ``torch.compile``s a real model: the builder of the artifact tests and bench.

The model is all-MiniLM-L6-v2 (a BERT sentence encoder) written out in plain torch ops and
loaded from ``model.safetensors`` of a model directory, so it reads the real weights
through an mmfs mount; ``--layers`` keeps the first N encoder layers (a smaller graph
compiles faster). The compile cache is inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR``:
the compiled kernels, the FX graph and AOT autograd caches, and the probes of the CPU's
vector ISA), copied whole, as vLLM workers copy theirs. torch's portable single-file cache
(``torch.compiler.save_cache_artifacts``) leaves the ISA probes out: a worker starting
from it still runs a dozen small g++ compiles, which here cost more than the model's own.

    # as the builder of ``mmfs artifact build`` (MMFS_MODEL_PATH / MMFS_ARTIFACT_OUT set):
    python -m mmfs.testing.compile_worker
    # as a worker that starts from a cache someone published (copied to its local folder):
    python -m mmfs.testing.compile_worker --model DIR --cache-in "$(mmfs artifact path ...)"

It prints one JSON line: seconds from start to the first inference, the output's sha256,
and inductor's FX graph cache hits and misses (a worker that loaded a usable cache
compiles nothing: hits, no misses). Each run gets a fresh local inductor cache directory
unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so two runs on one machine act as two nodes.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402 - the clock starts before the imports a worker pays for
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

#: Token ids of a short sentence ([CLS] ... [SEP]); no tokenizer needed.
TOKENS = [101, 1996, 2944, 5371, 11650, 2005, 28937, 9324, 2015, 102]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("MMFS_MODEL_PATH"),
                        help="the model directory (default: MMFS_MODEL_PATH)")
    parser.add_argument("--cache-in", help="an inductor cache folder to start from (copied into the local one)")
    parser.add_argument("--cache-out", default=os.environ.get("MMFS_ARTIFACT_OUT"),
                        help="write the compile cache here (default: MMFS_ARTIFACT_OUT)")
    parser.add_argument("--layers", type=int, default=int(os.environ.get("MMFS_COMPILE_LAYERS", "6")),
                        help="encoder layers to keep (default: 6, the whole model)")
    args = parser.parse_args()
    if not args.model:
        parser.error("--model or MMFS_MODEL_PATH is needed")
    local_cache = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mmfs-inductor-"))
    loaded = 0
    if args.cache_in:  # before torch is imported: inductor reads its folder from the start
        shutil.copytree(args.cache_in, local_cache, dirs_exist_ok=True)
        loaded = sum(p.stat().st_size for p in Path(args.cache_in).rglob("*") if p.is_file())

    import torch
    from safetensors import safe_open

    from torch._dynamo.utils import counters
    with safe_open(str(Path(args.model) / "model.safetensors"), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()
                   if k.startswith("embeddings.") or any(k.startswith(f"encoder.layer.{i}.") for i in range(args.layers))}
    torch.manual_seed(0)
    encoder = torch.compile(_Encoder(weights, args.layers))
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        output = encoder(ids)
    first_inference = time.perf_counter() - STARTED
    if args.cache_out:
        shutil.copytree(local_cache, args.cache_out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("locks"))
    print(json.dumps({"first_inference_s": round(first_inference, 3), "layers": args.layers,
                      "output_sha256": hashlib.sha256(output.numpy().tobytes()).hexdigest(),
                      "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
                      "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
                      "cache_in_bytes": loaded}), flush=True)
    return 0


def _Encoder(weights: dict, layers: int):  # noqa: N802 - builds a torch module after torch is imported
    """all-MiniLM-L6-v2's forward pass (embeddings, ``layers`` BERT layers, mean pooling)."""
    import torch
    import torch.nn.functional as F

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(v, requires_grad=False)
                                             for k, v in weights.items() if v.is_floating_point()})
            self.layers = layers

        def p(self, name: str) -> torch.Tensor:
            return self.w[name.replace(".", "_")]

        def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
            return F.layer_norm(x, x.shape[-1:], self.p(f"{name}.weight"), self.p(f"{name}.bias"), 1e-12)

        def dense(self, x: torch.Tensor, name: str) -> torch.Tensor:
            return F.linear(x, self.p(f"{name}.weight"), self.p(f"{name}.bias"))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            x = (F.embedding(ids, self.p("embeddings.word_embeddings.weight"))
                 + F.embedding(positions, self.p("embeddings.position_embeddings.weight"))
                 + self.p("embeddings.token_type_embeddings.weight")[0])
            x = self.norm(x, "embeddings.LayerNorm")
            heads = 12
            for i in range(self.layers):
                layer = f"encoder.layer.{i}"
                batch, length, width = x.shape

                def split(t: torch.Tensor) -> torch.Tensor:
                    return t.view(batch, length, heads, width // heads).transpose(1, 2)

                q, k, v = (split(self.dense(x, f"{layer}.attention.self.{n}")) for n in ("query", "key", "value"))
                attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
                x = self.norm(x + self.dense(attended, f"{layer}.attention.output.dense"),
                              f"{layer}.attention.output.LayerNorm")
                hidden = F.gelu(self.dense(x, f"{layer}.intermediate.dense"))
                x = self.norm(x + self.dense(hidden, f"{layer}.output.dense"), f"{layer}.output.LayerNorm")
            return F.normalize(x.mean(dim=1), dim=-1)

    return Encoder().eval()


if __name__ == "__main__":
    raise SystemExit(main())
