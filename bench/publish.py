"""Copy a run's report into the committed place: ``bench/RESULTS.md`` and ``bench/plots/``.

The analysis is written by people, from the numbers and the profile: it lives in
``bench/ANALYSIS.md`` and is appended under the tables, so a re-run keeps it (and its
numbers then need a re-read).
"""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path


def publish(out: Path, bench_dir: Path) -> Path:
    plots = bench_dir / "plots"
    if plots.exists():
        shutil.rmtree(plots)
    plots.mkdir()
    for png in sorted(out.glob("*.png")):
        shutil.copyfile(png, plots / png.name)
    profiles = out / "profiles"
    dest = bench_dir / "profiles"
    if profiles.is_dir():
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        for raw in sorted(profiles.glob("*.txt")):  # collapsed stacks compress about 10x
            with open(raw, "rb") as src, gzip.open(dest / (raw.name + ".gz"), "wb") as gz:
                shutil.copyfileobj(src, gz)
    md = (out / "RESULTS.md").read_text()
    md = re.sub(r"\]\(([^)/]+\.png)\)", r"](plots/\1)", md)
    md = md.replace("in the run's `profiles/` folder", "in `bench/profiles/` (gzipped; `zcat` them into "
                    "flamegraph.pl or speedscope)")
    analysis = bench_dir / "ANALYSIS.md"
    if analysis.exists():
        md = md.rstrip() + "\n\n" + analysis.read_text().strip() + "\n"
    target = bench_dir / "RESULTS.md"
    target.write_text(md)
    return target
