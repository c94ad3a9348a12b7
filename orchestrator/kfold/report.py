"""The k-fold report: a comparison table (markdown and CSV), a box plot, and ``summary.json``.

``write_report`` saves them under ``<set folder>/report/``; ``orch kfold`` prints the markdown at
the end, ``orch report SET`` reads ``summary.json`` back and prints the same text.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from cluster.errors import JobNotFound
from orchestrator.kfold.aggregate import PointSummary, compare_points

SUMMARY = "summary.json"


def _num(value: Optional[float], digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def comparison_markdown(points: Sequence[PointSummary], metric: str, mode: str = "max") -> str:
    """The comparison table (best first) followed by the per-class AP of the best point."""
    rows = compare_points(points, metric, mode)
    if not rows:
        return "(no finished folds to report)\n"
    k = max(len(p.folds) for p in points)
    by_name = {p.name: p for p in points}
    tested = any(p.test_mean for p in points)  # a held-out test file (kfold.test): test columns
    test_head, test_rule = (" test mean ± std |", "---:|") if tested else ("", "")
    lines = [
        f"### {metric}: mean ± std over {k} folds, out-of-fold, paired comparison with the best",
        "",
        f"| point | mean ± std | out-of-fold |{test_head} diff vs best | p (paired t) | per fold |",
        f"|---|---:|---:|{test_rule}---:|---:|---|",
    ]
    for r in rows:
        per_fold = " ".join(_num(v, 3) for v in r["folds"].values())
        label = f"**{r['point'] or '(all)'}**" if r["best"] else (r["point"] or "(all)")
        diff = "best" if r["best"] else f"{r['diff']:+.4f}"
        test = _test_cell(by_name[r["point"]], metric) if tested else ""
        lines.append(f"| {label} | {_num(r['mean'])} ± {_num(r['std'])} | {_num(r['oof'])} |{test} {diff} | "
                     f"{_num(r['p_value'], 3)} | {per_fold} |")
    best = by_name[rows[0]["point"]]
    classes = sorted({key.split("/", 1)[1] for key in best.mean if "_AP/" in key})
    if classes:
        prefix = metric.split("_", 1)[0] + "_AP/"
        lines += ["", f"Per-class AP of {rows[0]['point'] or 'the set'} (mean ± std over folds; out-of-fold"
                      f"{'; test mean ± std' if tested else ''}):", "",
                  f"| class | mean ± std | out-of-fold |{test_head}", f"|---|---:|---:|{test_rule}"]
        for c in classes:
            key = prefix + c
            test = _test_cell(best, key) if tested else ""
            lines.append(f"| {c} | {_num(best.mean.get(key))} ± {_num(best.std.get(key))} | {_num(best.oof.get(key))} |{test}")
    return "\n".join(lines) + "\n"


def _test_cell(point: PointSummary, key: str) -> str:
    return f" {_num(point.test_mean.get(key))} ± {_num(point.test_std.get(key))} |"


def write_csv(path: Path, points: Sequence[PointSummary], metric: str, mode: str) -> None:
    """One row per grid point and metric: mean, std, out-of-fold and each fold's value; the
    ``diff``/``p_value`` columns (for ``metric``) make the comparison machine-readable; the
    ``test_*`` columns (only with ``kfold.test``) hold the held-out test scores."""
    rows = {r["point"]: r for r in compare_points(points, metric, mode)}
    folds = sorted({f for p in points for f in p.folds})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        tested = any(p.test_mean for p in points)
        writer.writerow(["point", "metric", "mean", "std", "oof", "diff_vs_best", "p_value", *[f"fold_{f}" for f in folds],
                         *(["test_mean", "test_std", *[f"test_fold_{f}" for f in folds]] if tested else [])])
        for p in points:
            for key in sorted(set(p.mean) | set(p.oof) | set(p.test_mean)):
                r = rows.get(p.name) if key == metric else None
                test = [p.test_mean.get(key, ""), p.test_std.get(key, ""), *[p.test.get(f, {}).get(key, "") for f in folds]]
                writer.writerow([p.name, key, p.mean.get(key, ""), p.std.get(key, ""), p.oof.get(key, ""),
                                 "" if r is None else r["diff"], "" if r is None or r["p_value"] is None else r["p_value"],
                                 *[p.folds.get(f, {}).get(key, "") for f in folds], *(test if tested else [])])


def box_plot(path: Path, points: Sequence[PointSummary], metric: str) -> None:
    """A PNG box plot of the per-fold ``metric`` of each point (points drawn over the boxes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [p.name or "(all)" for p in points]
    data = [[m.get(metric, float("nan")) for m in p.folds.values()] for p in points]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(points)), 4.0))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right", fontsize=8)
    for i, values in enumerate(data, start=1):
        ax.scatter([i] * len(values), values, s=12, zorder=3)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per fold")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report_dir: Path, points: Sequence[PointSummary], metric: str, mode: str = "max",
                 meta: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """Write ``comparison.md``, ``comparison.csv``, ``boxplot.png`` and ``summary.json``; returns
    their paths by kind."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": report_dir / "comparison.md", "csv": report_dir / "comparison.csv",
             "boxplot": report_dir / "boxplot.png", "summary": report_dir / SUMMARY}
    paths["markdown"].write_text(comparison_markdown(points, metric, mode))
    write_csv(paths["csv"], points, metric, mode)
    box_plot(paths["boxplot"], points, metric)
    summary = {**(meta or {}), "metric": metric, "mode": mode, "points": [p.to_dict() for p in points]}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def read_report(report_dir: Path) -> tuple[dict[str, Any], list[PointSummary]]:
    """``summary.json`` of a report folder: its metadata and the point summaries."""
    path = Path(report_dir) / SUMMARY
    if not path.is_file():
        raise JobNotFound(f"{path} does not exist: the set has not finished; run orch kfold again to complete it")
    data = json.loads(path.read_text())
    return data, [PointSummary.from_dict(p) for p in data["points"]]
