"""Records of benchmark results: a figure is a list of repeated measurements.

A :class:`Figure` keeps every repeat (min/median/max are derived) and is summed up by
its *value*: the median, or the best repeat (``stat="max"`` for rates, ``"min"`` for
times and costs) where a measurement is best of N on a noisy machine. It may name a
*baseline* figure of the same scenario, measured in the same run: its ratio is
``value / baseline value``. An optional target is on the ratio (``ratio <= target_ratio``,
``ratio >= target_ratio_min``) or on the value itself (``value <= target_value``); the
report states whether the value meets it, the benchmark never asserts it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    values: list[float] = field(default_factory=list)
    baseline: str | None = None  # key of another figure of the same scenario
    target_ratio: float | None = None  # met when ratio <= target_ratio
    target_value: float | None = None  # met when value <= target_value
    target_ratio_min: float | None = None  # met when ratio >= target_ratio_min
    note: str = ""
    #: What sums the repeats up: "median", or the best repeat: "max" (a rate), "min" (a time, a cost).
    stat: str = "median"

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def min(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def max(self) -> float | None:
        return max(self.values) if self.values else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def value(self) -> float | None:
        """The figure's summary: its median, or its best repeat (``stat``)."""
        return {"median": self.median, "max": self.max, "min": self.min}[self.stat]

    @property
    def best_of(self) -> bool:
        return self.stat != "median"


@dataclass
class Scenario:
    id: str
    title: str
    status: str = "ok"  # ok | not available | error
    reason: str = ""
    figures: list[Figure] = field(default_factory=list)
    #: Free-form tables: {"title", "columns": [...], "rows": [[...]]}.
    tables: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    #: Raw data for plots (per-node times, latencies...).
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def figure(self, key: str, label: str = "", unit: str = "", **kwargs: Any) -> Figure:
        for fig in self.figures:
            if fig.key == key:
                return fig
        fig = Figure(key, label or key, unit, **kwargs)
        self.figures.append(fig)
        return fig

    def get(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)

    def ratio(self, fig: Figure) -> float | None:
        if fig.baseline is None:
            return None
        base = self.get(fig.baseline)
        if base is None or base.value in (None, 0) or fig.value is None:
            return None
        return fig.value / base.value

    def met(self, fig: Figure) -> bool | None:
        if fig.target_ratio is not None or fig.target_ratio_min is not None:
            ratio = self.ratio(fig)
            if ratio is None:
                return None
            if fig.target_ratio is not None and ratio > fig.target_ratio:
                return False
            return fig.target_ratio_min is None or ratio >= fig.target_ratio_min
        if fig.target_value is not None:
            return None if fig.value is None else fig.value <= fig.target_value
        return None

    def unavailable(self, reason: str) -> "Scenario":
        self.status, self.reason = "not available", reason
        return self

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for fig, raw in zip(self.figures, data["figures"]):
            raw.update(min=fig.min, median=fig.median, max=fig.max, value=fig.value, ratio=self.ratio(fig),
                       met=self.met(fig))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Scenario":
        figs = []
        for raw in data.get("figures", []):
            raw = {k: v for k, v in raw.items() if k in Figure.__dataclass_fields__}
            figs.append(Figure(**raw))
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "figures"}
        return cls(**fields, figures=figs)
