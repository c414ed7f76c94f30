"""Writing results: ``results.json``, a markdown report and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import Figure, Scenario  # noqa: E402


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"


def _baseline_label(s: Scenario, fig: Figure) -> str:
    if fig.baseline is None:
        return ""
    base = s.get(fig.baseline)
    return base.label if base else fig.baseline


def _target(fig: Figure) -> str:
    parts = []
    if fig.target_ratio_min is not None:
        parts.append(f"ratio ≥ {fig.target_ratio_min:g}")
    if fig.target_ratio is not None:
        parts.append(f"ratio ≤ {fig.target_ratio:g}")
    if not parts and fig.target_value is not None:
        parts.append(f"≤ {fig.target_value:g} {fig.unit}")
    return ", ".join(parts)


def _stat(fig: Figure) -> str:
    """How the figure's value sums its repeats up, for labels: '' (median) or 'best of N'."""
    return f"best of {len(fig.values)}" if fig.best_of else ""


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: ""}[value]


def scenario_markdown(s: Scenario) -> str:
    lines = [f"### {s.title}", ""]
    if s.status != "ok":
        lines += [f"**{s.status}**: {s.reason}", ""]
    if s.figures:
        has_target = any(_target(f) for f in s.figures)
        head = ["figure", "unit", "n", "min", "median", "max", "baseline (same run)", "ratio"]
        if has_target:
            head += ["target", "met"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for fig in s.figures:
            ratio = s.ratio(fig)
            label = fig.label + (f" ({fig.note})" if fig.note else "") + (f" [{_stat(fig)}]" if fig.best_of else "")
            row = [label, fig.unit, str(len(fig.values)), fmt(fig.min), fmt(fig.median), fmt(fig.max),
                   _baseline_label(s, fig),
                   "" if ratio is None else f"{ratio:.3g}×" + (" (best / best)" if fig.best_of else "")]
            if has_target:
                row += [_target(fig), _met(s.met(fig))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    for table in s.tables:
        lines += [f"*{table['title']}*", ""]
        lines.append("| " + " | ".join(table["columns"]) + " |")
        lines.append("|" + "---|" * len(table["columns"]))
        for row in table["rows"]:
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
    for note in s.notes:
        lines += [note, ""]
    for plot in s.plots:
        lines += [f"![{s.id}]({plot})", ""]
    return "\n".join(lines)


def machine_markdown(machine: dict[str, Any]) -> str:
    return (f"{machine['cores']} cores ({machine['cpu']}), {machine['ram_bytes'] / 2**30:.1f} GiB RAM, "
            f"kernel {machine['kernel']}, Python {machine['python']}")


#: The figures summed up at the top of the report: (scenario id, figure key, label, baseline label).
HEADLINES = [
    ("ingest", "tcp.gbps", "8. one cold node, warm backend, --transport tcp", "curl from the backend"),
    ("replicas", "upstream_ratio", "9. N nodes through 2 backend replicas: upstream bytes / model", ""),
    ("replicas", "all_done", "9. same: every node done, in units of model / hub rate", ""),
    ("ingest", "tcp.node_cpu", "8. same: node daemon CPU per GB", ""),
    ("ingest", "tcp.backend_cpu", "8. same: backend CPU per GB, serving from memory", ""),
    ("ingest", "nixl.gbps", "8. one cold node, warm backend, --transport nixl", "curl from the backend"),
    ("ingest", "nixl.node_cpu", "8. same: node daemon CPU per GB", ""),
    ("ingest", "nixl.backend_cpu", "8. same: backend CPU per GB, serving from memory", ""),
    ("ingest", "nixl.vs_tcp", "8. nixl against tcp", "--transport tcp"),
    ("ingest", "curl.gbps", "8. baseline: curl of the file from the backend's Hub API", ""),
    ("cold_start", "synthetic.mmfs.all", "1. cold start, synthetic model, N nodes: mmfs, all done", "model / hub rate"),
    ("cold_start", "synthetic.mmfs.vs_recipe", "1. same", "download-then-read recipe"),
    ("cold_start", "synthetic.hf.all", "1. same: N x snapshot_download, all done", "model / hub rate"),
    ("cold_start", "synthetic.dynamo.all", "1. same: download-then-read recipe, all done", "model / hub rate"),
    ("cold_start", "synthetic.endpoint.all", "1. same: N x snapshot_download via mmfs-backend", "model / hub rate"),
    ("cold_start", "synthetic.mmfs.upstream", "1. same: mmfs upstream bytes / model", ""),
    ("cold_start", "synthetic.restart.all", "1. cluster restart, backend warm: mmfs, all done", "model / hub rate"),
    ("cold_start", "real.mmfs.all", "1. cold start, all-MiniLM-L6-v2: mmfs, all done", "model / hub rate"),
    ("cold_start", "real.mmfs.vs_recipe", "1. same", "download-then-read recipe"),
    ("first_tensor", "bigfile.cold", "2. first tensor of the big file, all cold", "full download of the file"),
    ("first_tensor", "bigfile.warm_backend", "2. same, backend warm", "full download of the file"),
    ("sequential", "mmfs.warm_node", "3a. sequential, node cache warm, page cache dropped", "O_DIRECT read, same file"),
    ("sequential", "mmfs.page_cache", "3b. sequential, page cache warm", "native, warm"),
    ("sequential", "mmfs.cold", "3c. sequential, node cold, backend warm", "native, warm"),
    ("sequential", "mmfs.cold_vs_loopback", "3c. same", "loopback TCP"),
    ("mmap", "mount.cold", "4. safe_open all tensors, node warm, page cache dropped", "local, dropped"),
    ("mmap", "mount.warm", "4. same, page cache warm", "local, warm"),
    ("mmap", "mount.cold_node", "4. same, node cold, backend warm", "local, dropped"),
    ("random", "warm.p50", "5. random 4 KiB, node warm: p50", "local, dropped"),
    ("random", "warm.p99", "5. random 4 KiB, node warm: p99", "local, dropped"),
    ("random", "cold.p50", "5. random 4 KiB, node cold: p50", "local, dropped"),
    ("random", "cold.p99", "5. random 4 KiB, node cold: p99", "local, dropped"),
    ("memory", "node.peak", "6. node daemon peak RSS", "its --memory-cache"),
    ("memory", "backend.peak", "6. backend peak RSS", "its --memory-cache"),
    ("memory", "synthetic.mmfs.node_cpu", "6. node daemon CPU per GB read (cold start)", "snapshot_download's"),
    ("artifacts", "warm", "11. torch.compile: start to first inference with another node's cache", "compiling"),
    ("memory", "synthetic.mmfs.backend_cpu", "6. backend CPU per GB served (cold start)", ""),
    ("memory", "synthetic.restart.backend_cpu", "6. backend CPU per GB served from memory (restart)", ""),
]


def headlines_markdown(scenarios: list[Scenario]) -> str:
    by_id = {s.id: s for s in scenarios}
    rows = []
    for sid, key, label, base_label in HEADLINES:
        s = by_id.get(sid)
        fig = s.get(key) if s else None
        if s is None or fig is None or fig.value is None:
            continue
        ratio = s.ratio(fig)
        rows.append(f"| {label} | {fmt(fig.value)} {fig.unit}" + (f" ({_stat(fig)})" if fig.best_of else "") + " | "
                    + (f"{ratio:.3g}× {base_label}" if ratio is not None else "")
                    + f" | {_target(fig)} {_met(s.met(fig))} |")
    if not rows:
        return ""
    return "\n".join(["## Headlines (medians, or best of N where marked)", "",
                      "| figure | value | ratio to its baseline (same run) | target |",
                      "|---|---|---|---|", *rows, ""])


def markdown(run: dict[str, Any], scenarios: list[Scenario]) -> str:
    lines = ["# mmfs benchmark results", "",
             f"- Mode: {'quick' if run['config']['quick'] else 'full'}; started {run['started']}, "
             f"took {run['seconds'] / 60:.1f} min",
             f"- Machine: {machine_markdown(run['machine'])}",
             f"- Command: `{run['command']}`",
             f"- Commit: `{run.get('commit', '?')}`", "",
             "Every figure is min/median/max over its repeats; *ratio* is median / median of its baseline "
             "measured in the same run, or best / best where a figure is marked *best of N* (its repeats "
             "alternate with the baseline's; best is the highest rate, the lowest time or CPU cost). This "
             "machine is noisy: read ratios, not absolute numbers. Benchmarks report, they do not assert: "
             "*met* states whether the value meets the issue's target.",
             ""]
    head = headlines_markdown(scenarios)
    if head:
        lines += [head, "## Scenarios", ""]
    for s in scenarios:
        lines.append(scenario_markdown(s))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------
# Plots


def _bar_plot(s: Scenario, path: Path, figures: list[Figure], title: str, unit: str) -> None:
    figs = [f for f in figures if f.values]
    if not figs:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(figs) + 1.6))
    y = range(len(figs))
    med = [f.value for f in figs]  # the median, or the best repeat where the figure is best of N
    err = [[f.value - f.min for f in figs], [f.max - f.value for f in figs]]
    colors = ["tab:green" if "mmfs" in f.label or f.key.split(".")[-1] in ("mount",) or "mount" in f.key
              else "tab:gray" for f in figs]
    ax.barh(list(y), med, xerr=err, color=colors, capsize=3)
    ax.set_yticks(list(y))
    ax.set_yticklabels([f.label if len(f.label) < 70 else f.label[:67] + "..." for f in figs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    fig.suptitle(title, fontsize=10)
    for i, f in enumerate(figs):
        ratio = s.ratio(f)
        if ratio is not None:
            ax.text(f.value, i, f"  {ratio:.2f}×", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scenario(s: Scenario, out: Path) -> list[str]:
    """Write this scenario's PNGs into ``out``; return their file names."""
    names: list[str] = []
    by_unit: dict[str, list[Figure]] = {}
    for f in s.figures:
        by_unit.setdefault(f.unit, []).append(f)
    for unit, figs in by_unit.items():
        if unit == "x" and s.id == "cold_start":
            pass
        safe = {"s": "time", "ms": "latency", "GB/s": "throughput", "MiB": "memory", "x": "ratio",
                "%": "percent", "GB": "bytes", "CPU s/GB": "cpu"}.get(unit, unit.replace("/", "_").replace(" ", "_"))
        name = f"{s.id}_{safe}.png"
        _bar_plot(s, out / name, figs, s.title, unit)
        if (out / name).exists():
            names.append(name)
    extra = EXTRA_PLOTS.get(s.id)
    if extra:
        names += extra(s, out)
    return names


def _cold_start_nodes(s: Scenario, out: Path) -> list[str]:
    per_node = s.data.get("per_node") or {}
    names = []
    for tag, variants in per_node.items():
        if not variants:
            continue
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for i, (variant, reps) in enumerate(variants.items()):
            for times in reps:
                ax.scatter(sorted(times), [i] * len(times), s=14, alpha=0.6, color=f"C{i}")
        limit = s.get(f"{tag}.limit")
        if limit and limit.median:
            ax.axvline(limit.median, color="k", ls="--", lw=1, label="model / hub rate")
            ax.axvline(1.15 * limit.median, color="tab:red", ls=":", lw=1, label="target 1.15 x limit")
        ax.set_yticks(range(len(variants)))
        ax.set_yticklabels(list(variants), fontsize=8)
        ax.set_xlabel("seconds until the node finished reading the model")
        ax.set_title(f"Cluster cold start, {tag} model: per-node finish times (all repeats)", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"cold_start_nodes_{tag}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _random_cdf(s: Scenario, out: Path) -> list[str]:
    lat = s.data.get("latencies") or {}
    if not lat:
        return []
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for label, values in lat.items():
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency of one 4 KiB pread (ms, log)")
    ax.set_ylabel("fraction of reads")
    ax.set_title("Random 4 KiB reads: latency CDF", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "random_cdf.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


def _scale_plot(s: Scenario, out: Path) -> list[str]:
    curves = s.data.get("curves") or {}
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] / 60 for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("minutes until all nodes loaded the model")
    ax.set_title(s.title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "scale_model.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


EXTRA_PLOTS = {"cold_start": _cold_start_nodes, "random": _random_cdf, "scale": _scale_plot}


def write_all(run: dict[str, Any], scenarios: list[Scenario], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for s in scenarios:
        try:
            s.plots = plot_scenario(s, out)
        except Exception as err:  # a broken plot must not lose the numbers
            s.notes.append(f"(plot failed: {err!r})")
    data = {**run, "scenarios": [s.to_json() for s in scenarios]}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = markdown(run, scenarios)
    path = out / "RESULTS.md"
    path.write_text(md)
    return path
