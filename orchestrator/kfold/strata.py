"""What the folds balance beyond classes: bins of the box count and of the median box area of
each image (``orch split --stratify classes,count,area``, ``kfold.stratify``).

A detector's score depends on how crowded its images are and how small their objects are, not
only on which classes they hold; a fold whose validation set got the crowded images, or the
tiny objects, scores lower for reasons that have nothing to do with the model. Each stratum adds
one-hot columns to the multilabel matrix that ``MultilabelStratifiedKFold`` balances:

- ``count``: the number of boxes on the image, in up to four bins cut at the quartiles of the
  counts of the non-empty images (so the bins adapt to the data: shapes with 1-4 boxes get
  ``1``, ``2``, ``3``, ``4+``; a crowded dataset ``1-2``, ``3-5``, ...), plus ``0`` for empty
  images;
- ``area``: the median box area (``w * h`` of the bbox) of the image, in up to four bins cut at
  the quartiles of those medians, labelled by the side of a square of that area
  (``<=24^2``, ``<=40^2``, ``>40^2``), plus ``none`` for empty images.

Quartiles rather than COCO's fixed small/medium/large ranges: a dataset whose objects are all
"medium" would otherwise get a single bin and no balancing at all.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from statistics import median
from typing import Any, Iterable, Sequence, Union

from cluster.errors import ConfigError

STRATA = ("classes", "count", "area")
DEFAULT = ("classes",)
QUANTILES = (0.25, 0.5, 0.75)


def parse_stratify(value: Union[str, Iterable[str], None]) -> tuple[str, ...]:
    """``"classes,count"`` (or a list) as a checked tuple in the canonical order; None -> default.
    ConfigError for an unknown or empty choice."""
    if value is None:
        return DEFAULT
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    unknown = [v for v in items if v not in STRATA]
    if unknown or not items:
        raise ConfigError(f"--stratify {','.join(items) or '(empty)'}: choose one or more of {','.join(STRATA)} "
                          f"(kfold.stratify), e.g. --stratify classes,count,area")
    return tuple(s for s in STRATA if s in items)


def _cuts(values: Sequence[float]) -> list[float]:
    """Upper (inclusive) ends of the bins: the distinct quartiles below the maximum."""
    if not values:
        return []
    ordered = sorted(values)
    picks = [ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] for q in QUANTILES]
    return sorted({p for p in picks if p < ordered[-1]})


def _bin(value: float, cuts: Sequence[float]) -> int:
    for index, cut in enumerate(cuts):
        if value <= cut:
            return index
    return len(cuts)


def _count_labels(cuts: Sequence[int]) -> list[str]:
    labels, low = [], 1
    for cut in cuts:
        labels.append(str(low) if low == cut else f"{low}-{cut}")
        low = int(cut) + 1
    return labels + [f"{low}+"]


def _area_labels(cuts: Sequence[float]) -> list[str]:
    sides = [round(math.sqrt(c)) for c in cuts]
    return [f"<={s}^2" for s in sides] + [f">{sides[-1]}^2" if sides else "all"]


def image_bins(coco: dict) -> dict[str, dict[int, str]]:
    """``{"count": {image id: bin label}, "area": {image id: bin label}}`` for every image."""
    boxes: dict[int, list[float]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco.get("annotations", []):
        w, h = ann["bbox"][2:4]
        boxes.setdefault(ann["image_id"], []).append(float(w) * float(h))
    counts = {i: len(b) for i, b in boxes.items()}
    medians = {i: median(b) for i, b in boxes.items() if b}
    count_cuts = _cuts([n for n in counts.values() if n])
    area_cuts = _cuts(list(medians.values()))
    count_names, area_names = _count_labels(count_cuts), _area_labels(area_cuts)
    return {
        "count": {i: ("0" if n == 0 else count_names[_bin(n, count_cuts)]) for i, n in counts.items()},
        "area": {i: (area_names[_bin(medians[i], area_cuts)] if i in medians else "none") for i in counts},
    }


def bin_order(labels: Iterable[str]) -> list[str]:
    """Bin labels in their natural order (``0``/``none`` first, then ascending)."""
    def key(label: str) -> tuple[int, float]:
        if label in ("0", "none"):
            return (0, 0.0)
        digits = "".join(c if c.isdigit() else " " for c in label).split()
        return (2 if label.startswith(">") or label.endswith("+") else 1, float(digits[0]) if digits else 0.0)

    return sorted(set(labels), key=key)


def strata_columns(coco: dict, stratify: Sequence[str]) -> tuple[list[str], dict[int, list[int]]]:
    """The extra stratification columns (``count:<bin>``, ``area:<bin>``) and, per image id, the
    indices of its columns (one per stratum)."""
    extra = [s for s in stratify if s != "classes"]
    if not extra:
        return [], {}
    bins = image_bins(coco)
    names: list[str] = []
    for stratum in extra:
        names += [f"{stratum}:{label}" for label in bin_order(bins[stratum].values())]
    index = {name: j for j, name in enumerate(names)}
    rows = {img["id"]: [index[f"{s}:{bins[s][img['id']]}"] for s in extra] for img in coco["images"]}
    return names, rows


def strata_table(coco: dict, folds: Sequence[Any], stratify: Sequence[str]) -> str:
    """Per fold, its validation images in each count bin and each area bin (empty when only
    ``classes`` is stratified)."""
    extra = [s for s in stratify if s != "classes"]
    if not extra:
        return ""
    from rich.console import Console
    from rich.table import Table

    bins = image_bins(coco)
    columns = [(s, label) for s in extra for label in bin_order(bins[s].values())]
    title = " and ".join({"count": "box count", "area": "median box area"}[s] for s in extra)
    table = Table(title=f"validation images per bin of {title}")
    table.add_column("fold", justify="right")
    for stratum, label in columns:
        table.add_column(f"{stratum} {label}", justify="right")
    groups = [(str(f.fold), f.val_ids) for f in folds] + [("all", tuple(img["id"] for img in coco["images"]))]
    for name, ids in groups:
        tallies = {s: Counter(bins[s][i] for i in ids) for s in extra}
        table.add_row(name, *[str(tallies[s][label]) for s, label in columns])
    out = io.StringIO()
    Console(width=max(80, 10 + 13 * len(columns)), color_system=None, file=out).print(table)
    return out.getvalue()
