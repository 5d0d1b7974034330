"""The result of a study: accuracies of methods over scenarios and seeded maps, with their
statistics, a table, a plot and files.

A study is either a *sweep* over the levels of one scenario kind (``kind`` ``"faults"``,
``"variability"`` or ``"bitflips"``: rows ``(method, level, trial, seed, acc)``, a table of
levels by methods, accuracy plotted against the level) or a *comparison* over labelled
scenarios (``kind`` ``"compare"``: rows ``(scenario, kind, level, chip_sigma, method, trial,
seed, acc)``, the scenario ``"ideal device"`` holding each method's model on ideal hardware;
a markdown table of methods by scenarios, grouped bars).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

from qfv_brevitas.util.safeio import atomic_paths

__all__ = ["StudyResult", "accuracy_stats", "COMPARISON", "IDEAL"]

#: ``StudyResult.kind`` of a comparison over labelled scenarios.
COMPARISON = "compare"
#: Scenario label of the ideal-device rows of a comparison.
IDEAL = "ideal device"
_LEVEL_NAMES = {"faults": "bit-fault rate", "bitflips": "bit-error rate",
                "variability": "sigma/mu"}
_SWEEP_FIELDS = ["method", "level", "trial", "seed", "acc"]
_COMPARISON_FIELDS = ["scenario", "kind", "level", "chip_sigma", "method", "trial", "seed",
                      "acc"]


def accuracy_stats(accs: List[float]) -> dict:
    """Mean, sample std, min, max and count of accuracies over Monte Carlo trials.

    >>> accuracy_stats([1.0, 3.0])
    {'mean': 2.0, 'std': 1.4142135623730951, 'min': 1.0, 'max': 3.0, 'trials': 2}
    """
    n = len(accs)
    mean = sum(accs) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(accs), "max": max(accs), "trials": n}


@dataclass
class StudyResult:
    """Accuracies of methods over scenarios and maps (see the module docstring): a sweep over
    the levels of ``kind`` (``"faults"``, ``"variability"``, ``"bitflips"``) or a comparison
    (``kind="compare"``)."""

    kind: str = COMPARISON
    rows: List[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def is_comparison(self) -> bool:
        return self.kind == COMPARISON

    @property
    def level_name(self) -> str:
        """What the level of a sweep is (``"bit-fault rate"``, ``"sigma/mu"``, ...)."""
        return _LEVEL_NAMES.get(self.kind, "sigma/mu")

    @property
    def fields(self) -> List[str]:
        """The keys of a row (the CSV columns)."""
        return _COMPARISON_FIELDS if self.is_comparison else _SWEEP_FIELDS

    @property
    def methods(self) -> List[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    @property
    def scenario_labels(self) -> List[str]:
        return list(dict.fromkeys(r["scenario"] for r in self.rows)) if self.is_comparison \
            else []

    def _group(self) -> tuple:
        return ("scenario", "method") if self.is_comparison else ("method", "level")

    def summary(self) -> List[dict]:
        """Per (scenario, method) of a comparison, per (method, level) of a sweep: mean, std
        (sample), min, max of accuracy over the maps."""
        keys = self._group()
        groups: Dict[tuple, List[float]] = {}
        for r in self.rows:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r["acc"])
        return [dict(zip(keys, key), **accuracy_stats(accs)) for key, accs in groups.items()]

    def winners(self, with_selftune: bool = True) -> Dict[str, List[str]]:
        """Per scenario of a comparison (not the ideal device), the method(s) with the highest
        mean accuracy (all within 1e-9 of it); ``with_selftune=False`` leaves the self-tuned
        rows out. Empty for a sweep."""
        if not self.is_comparison:
            return {}
        best: Dict[str, List[str]] = {}
        by_sc: Dict[str, List[dict]] = {}
        for s in self.summary():
            if s["scenario"] == IDEAL:
                continue
            if not with_selftune and "selftune" in s["method"]:
                continue
            by_sc.setdefault(s["scenario"], []).append(s)
        for sc, items in by_sc.items():
            top = max(i["mean"] for i in items)
            best[sc] = [i["method"] for i in items if i["mean"] >= top - 1e-9]
        return best

    def table(self) -> str:
        """A sweep: levels as rows, methods as columns, ``mean +- std (min)`` in percent. A
        comparison: a markdown table, one row per method, one column per scenario, the best
        mean of each scenario in bold, ``n/a`` where a method does not apply."""
        return self._comparison_table() if self.is_comparison else self._sweep_table()

    def _sweep_table(self) -> str:
        summ = self.summary()
        methods = list(dict.fromkeys(s["method"] for s in summ))
        levels = sorted({s["level"] for s in summ})
        by = {(s["method"], s["level"]): s for s in summ}
        head = f"{self.level_name:>14} | " + " | ".join(f"{m:^24}" for m in methods)
        lines = [head, "-" * len(head)]
        for lv in levels:
            cells = []
            for m in methods:
                s = by.get((m, lv))
                cells.append(f"{'':^24}" if s is None else
                             f"{100 * s['mean']:6.2f} +- {100 * s['std']:5.2f} ({100 * s['min']:6.2f})")
            lines.append(f"{lv:>14g} | " + " | ".join(cells))
        return "\n".join(lines)

    def _comparison_table(self) -> str:
        summ = {(s["scenario"], s["method"]): s for s in self.summary()}
        scs = self.scenario_labels
        best = self.winners()
        lines = ["| method | " + " | ".join(scs) + " |", "|---" * (len(scs) + 1) + "|"]
        for m in self.methods:
            cells = []
            for sc in scs:
                s = summ.get((sc, m))
                if s is None:
                    cells.append("n/a")
                    continue
                txt = (f"{100 * s['mean']:.2f}" if s["trials"] == 1 else
                       f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f} ({100 * s['min']:.2f})")
                cells.append(f"**{txt}**" if m in best.get(sc, ()) else txt)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, out_dir: Union[str, Path], name: Optional[str] = None,
             overwrite: bool = False) -> Dict[str, Path]:
        """Write ``name.csv`` (every map), ``name.json`` (rows, summary, meta; a sweep's kind
        and level name, a comparison's winners), ``name.md`` (a comparison's table) and
        ``name.png`` (the plot), together and atomically (:mod:`qfv_brevitas.util.safeio`):
        existing files only with ``overwrite``. ``name`` defaults to ``"compare"`` for a
        comparison, the kind for a sweep."""
        name = name or self.kind
        out = Path(out_dir)
        kinds = ("csv", "json", "md", "png") if self.is_comparison else ("csv", "json", "png")
        paths = {k: out / f"{name}.{k}" for k in kinds}
        with atomic_paths(list(paths.values()), overwrite=overwrite) as tmps:
            tmp = dict(zip(paths, tmps))
            with open(tmp["csv"], "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                for r in self.rows:
                    w.writerow({k: r.get(k) for k in self.fields})
            if self.is_comparison:
                data = {"meta": self.meta, "summary": self.summary(),
                        "winners": self.winners(),
                        "winners_without_selftune": self.winners(False), "rows": self.rows}
                tmp["md"].write_text(self.table() + "\n")
            else:
                data = {"kind": self.kind, "level_name": self.level_name, "meta": self.meta,
                        "summary": self.summary(), "rows": self.rows}
            tmp["json"].write_text(json.dumps(data, indent=2, default=str))
            self.plot(tmp["png"], overwrite=True, format="png")
        return paths

    def headline(self) -> str:
        """The figure's title in words: ``meta["title"]`` if set, else what is plotted, of
        ``meta["model"]`` (e.g. ``"small_cnn on digits"``) when known."""
        if self.meta.get("title"):
            return str(self.meta["title"])
        what = ("Test accuracy of each method in each chip scenario" if self.is_comparison
                else f"Test accuracy against the {self.level_name}")
        return f"{what}: {self.meta['model']}" if self.meta.get("model") else what

    def figure(self):
        """The plot as a :class:`matplotlib.figure.Figure` (a sweep: accuracy against level,
        one line per method; a comparison: a panel of bars per scenario), not yet written."""
        from qfv_brevitas.studies import plots

        if self.is_comparison:
            return plots.accuracy_by_scenario_figure(self.summary(), self.scenario_labels,
                                                     self.methods, self.headline())
        return plots.accuracy_by_level_figure(self.summary(), self.level_name, self.headline())

    def plot(self, path: Union[str, Path], overwrite: bool = False,
             format: Optional[str] = None) -> Path:
        """Write :meth:`figure` to ``path`` atomically (an existing file only with
        ``overwrite``). Error bars: ±1 std over the maps; a comparison's black tick: the worst
        map."""
        from qfv_brevitas.studies import plots

        return plots.save_figure(self.figure(), path, overwrite=overwrite, format=format)
