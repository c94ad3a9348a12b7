"""Leak-free K-fold splits of a COCO file: whole images, stratified on per-image class presence.

Why this design (see FIELD_NOTES "k-fold for detection"): splitting annotations puts one image in
train and validation at once (the ``cocosplit --multi-class`` bug), so the unit here is the image,
or a user-named group of images (a video, a site) when ``group_key``/``group_regex`` is given.

Stratification is the iterative stratification of Sechidis et al. (2011), as
``iterative-stratification``'s ``MultilabelStratifiedKFold`` computes it (:func:`_stratified_folds`
gives the same folds for the same seed, with numpy alone: that package imports scikit-learn,
~1.5 s here), on a 0/1 matrix (one row per image or group, one column per class, plus an "empty"
column so that images without annotations are spread evenly too). With groups, each group's row is the union of its images'
class presence: the groups are stratified and then expanded back to their images. We prefer this
to scikit-learn's ``StratifiedGroupKFold``, which stratifies one label per sample (a detection
image has several classes) and so balances annotations rather than class *presence*.
``stratify`` (``kfold.stratify``, ``orch split --stratify``) adds one-hot columns for bins of the
box count and the median box area of each image (:mod:`orchestrator.kfold.strata`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from cluster.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldSplit:
    """One fold: the image ids it validates on and the ones it trains on (sorted, disjoint)."""

    fold: int
    train_ids: tuple[int, ...]
    val_ids: tuple[int, ...]


def _image_keys(coco: dict, group_key: Optional[str], group_regex: Optional[str]) -> list[Any]:
    """The group of each image (in ``coco["images"]`` order); the image id when ungrouped."""
    images = coco["images"]
    if group_key and group_regex:
        raise ConfigError("give either --group-key or --group-regex, not both (kfold.group_key / kfold.group_regex)")
    if group_key:
        missing = [img["id"] for img in images if group_key not in img]
        if missing:
            raise ConfigError(
                f"group key {group_key!r} is missing from {len(missing)} image(s) (first id {missing[0]}); "
                f"use an image field present on every image or --group-regex on file_name"
            )
        return [("key", str(img[group_key])) for img in images]
    if group_regex:
        try:
            pattern = re.compile(group_regex)
        except re.error as err:
            raise ConfigError(f"--group-regex {group_regex!r} is not a valid regular expression: {err}") from None
        keys = []
        for img in images:
            match = pattern.search(str(img.get("file_name", "")))
            if match is None:
                raise ConfigError(
                    f"--group-regex {group_regex!r} does not match file_name {img.get('file_name')!r} "
                    f"(image id {img['id']}); widen the pattern so every image gets a group"
                )
            keys.append(("re", match.group(1) if pattern.groups else match.group(0)))
        return keys
    return [("id", img["id"]) for img in images]


def _validate(coco: Any) -> None:
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DataError("the annotation file has no 'images' list; give a COCO instances JSON file")
    ids = [img.get("id") for img in coco["images"]]
    if len(set(ids)) != len(ids):
        raise DataError("the annotation file repeats image ids; every image needs a unique 'id'")


def split_folds(
    coco: dict,
    k: int,
    seed: int = 0,
    group_key: Optional[str] = None,
    group_regex: Optional[str] = None,
    allow_small_classes: bool = False,
    stratify: Sequence[str] = ("classes",),
) -> list[FoldSplit]:
    """Split the images of ``coco`` (a COCO dict) into ``k`` folds, deterministically from ``seed``.

    ``stratify`` names what the folds balance: ``classes`` (class presence), ``count`` and
    ``area`` (bins of box count and median box area per image; :mod:`orchestrator.kfold.strata`).

    Raises :class:`ConfigError` when ``k`` < 2, when ``k`` exceeds the number of images (or groups),
    or when a class appears on fewer than ``k`` images (groups) — a warning instead when
    ``allow_small_classes`` — because such a class would be absent from some validation fold.
    """
    import numpy as np

    from orchestrator.kfold.strata import parse_stratify, strata_columns

    _validate(coco)
    stratify = parse_stratify(stratify)
    if not isinstance(k, int) or k < 2:
        raise ConfigError(f"--folds {k!r}: k-fold needs at least 2 folds (kfold.folds)")
    keys = _image_keys(coco, group_key, group_regex)
    groups = list(dict.fromkeys(keys))  # first-seen order: deterministic for a given file
    unit = "groups" if (group_key or group_regex) else "images"
    if k > len(groups):
        raise ConfigError(f"--folds {k} is more than the {len(groups)} {unit} in the annotation file; use --folds <= {len(groups)}")

    cat_ids = sorted({c["id"] for c in coco.get("categories", [])} | {a["category_id"] for a in coco.get("annotations", [])})
    col = {cid: j for j, cid in enumerate(cat_ids)}
    group_row = {g: i for i, g in enumerate(groups)}
    image_group = {img["id"]: group_row[key] for img, key in zip(coco["images"], keys)}
    # columns: one per class, then "has an empty image" (at least 2 columns, as iterstrat had)
    y = np.zeros((len(groups), max(len(cat_ids) + 1, 2)), dtype=bool)
    annotated = set()
    for ann in coco.get("annotations", []):
        if ann["image_id"] not in image_group:
            raise DataError(f"annotation {ann.get('id')} refers to image id {ann['image_id']}, which is not in 'images'")
        y[image_group[ann["image_id"]], col[ann["category_id"]]] = True
        annotated.add(ann["image_id"])
    for img in coco["images"]:
        if img["id"] not in annotated:
            y[image_group[img["id"]], len(cat_ids)] = True
    y = _with_strata(y, coco, image_group, stratify, strata_columns)

    names = {c["id"]: c.get("name", str(c["id"])) for c in coco.get("categories", [])}
    counts = y[:, : len(cat_ids)].sum(axis=0)
    small = [f"{names.get(cid, cid)} ({int(n)})" for cid, n in zip(cat_ids, counts) if 0 < n < k]
    if small:
        message = (
            f"{len(small)} class(es) appear on fewer than {k} {unit}: {', '.join(small[:5])}; "
            f"some validation folds will lack them (use fewer --folds, or --allow-small-classes)"
        )
        if not allow_small_classes:
            raise ConfigError(message)
        log.warning(message)

    group_fold = _stratified_folds(y, k, seed)

    folds = []
    all_ids = sorted(image_group)
    for fold in range(k):
        val = tuple(i for i in all_ids if group_fold[image_group[i]] == fold)
        train = tuple(i for i in all_ids if group_fold[image_group[i]] != fold)
        folds.append(FoldSplit(fold=fold, train_ids=train, val_ids=val))
    return folds


def _stratified_folds(y: Any, k: int, seed: int) -> Any:
    """The validation fold of each row of the 0/1 matrix ``y``: iterative stratification
    (Sechidis, Tsoumakas, Vlahavas, ECML PKDD 2011), exactly as
    ``iterstrat.ml_stratifiers.MultilabelStratifiedKFold(n_splits=k, shuffle=True,
    random_state=seed)`` assigns them (its algorithm, BSD-3, T. J. Bradberry; the same random
    draws in the same order), without importing scikit-learn."""
    import numpy as np

    labels_all = np.asarray(y, dtype=bool)
    n = labels_all.shape[0]
    rng = np.random.RandomState(seed)
    order = np.arange(n)
    rng.shuffle(order)
    labels = labels_all[order]
    test_folds = np.zeros(n, dtype=int)
    c_folds = np.full(k, 1 / k) * n  # wanted rows per fold
    c_folds_labels = np.outer(np.full(k, 1 / k), labels.sum(axis=0))  # wanted rows per fold and column
    left = np.ones(n, dtype=bool)
    while left.any():
        num_labels = labels[left].sum(axis=0)
        if num_labels.sum() == 0:  # only all-zero rows left: spread them evenly
            for row in np.where(left)[0]:
                fold = np.where(c_folds == c_folds.max())[0]
                fold = fold[rng.choice(fold.shape[0])] if fold.shape[0] > 1 else fold[0]
                test_folds[row] = fold
                c_folds[fold] -= 1
            break
        # the column with the fewest (but at least one) rows left, ties broken at random
        label = np.where(num_labels == num_labels[np.nonzero(num_labels)].min())[0]
        if label.shape[0] > 1:
            label = label[rng.choice(label.shape[0])]
        for row in np.where(np.logical_and(labels[:, label].flatten(), left))[0]:
            # the fold that most wants this column, then the one wanting most rows, then at random
            wanted = c_folds_labels[:, label]
            fold = np.where(wanted == wanted.max())[0]
            if fold.shape[0] > 1:
                tie = np.where(c_folds[fold] == c_folds[fold].max())[0]
                fold = fold[tie][rng.choice(tie.shape[0])] if tie.shape[0] > 1 else fold[tie[0]]
            else:
                fold = fold[0]
            test_folds[row] = fold
            left[row] = False
            c_folds_labels[fold, labels[row]] -= 1
            c_folds[fold] -= 1
    return test_folds[np.argsort(order)]


def _with_strata(y: Any, coco: dict, image_group: dict, stratify: Sequence[str], strata_columns: Any) -> Any:
    """The class matrix ``y`` with the count/area bin columns of ``stratify`` added (a group's
    row is the union of its images' bins); without ``classes`` only the bin columns are kept."""
    import numpy as np

    names, rows = strata_columns(coco, stratify)
    extra = np.zeros((y.shape[0], len(names)), dtype=bool)
    for image_id, columns in rows.items():
        extra[image_group[image_id], columns] = True
    parts = ([y] if "classes" in stratify else []) + [extra]
    out = np.concatenate(parts, axis=1)
    return out if out.shape[1] >= 2 else np.pad(out, ((0, 0), (0, 2 - out.shape[1])))  # as iterstrat had


def check_folds(coco: dict, folds: list[FoldSplit]) -> None:
    """Check the folds are leak-free: every image of ``coco`` is in exactly one validation fold and
    in no train set of its own fold (and in the train set of every other fold).
    Raises :class:`DataError` naming the first offending image."""
    ids = {img["id"] for img in coco["images"]}
    seen: dict[int, int] = {}
    for f in folds:
        train, val = set(f.train_ids), set(f.val_ids)
        for i in val:
            if i in seen:
                raise DataError(f"image {i} is in the validation sets of folds {seen[i]} and {f.fold}; re-run orch split")
            seen[i] = f.fold
        leaked = train & val
        if leaked:
            raise DataError(f"image {min(leaked)} is in both train and val of fold {f.fold}; re-run orch split")
        if train | val != ids:
            odd = sorted((train | val) ^ ids)[0]
            raise DataError(f"fold {f.fold} does not cover the annotation file exactly (image {odd}); re-run orch split")
    missing = ids - set(seen)
    if missing:
        raise DataError(f"image {min(missing)} is in no validation fold; re-run orch split")


def fold_stats(coco: dict, ids: tuple[int, ...]) -> dict[str, Any]:
    """Counts of a subset of images: ``images``, ``annotations``, and per class name
    ``(instances, images)``."""
    wanted = set(ids)
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco.get("categories", [])}
    instances: dict[str, int] = defaultdict(int)
    images: dict[str, set] = defaultdict(set)
    n_ann = 0
    for ann in coco.get("annotations", []):
        if ann["image_id"] in wanted:
            name = names.get(ann["category_id"], str(ann["category_id"]))
            instances[name] += 1
            images[name].add(ann["image_id"])
            n_ann += 1
    per_class = {name: (instances.get(name, 0), len(images.get(name, ()))) for name in names.values()}
    return {"images": len(wanted), "annotations": n_ann, "classes": per_class}


def balance_table(coco: dict, folds: list[FoldSplit], stratify: Sequence[str] = ("classes",)) -> str:
    """A plain-text table of each fold's validation set: images, annotations, and per class
    ``instances/images``; the last row is the whole file. With ``count``/``area`` in ``stratify``,
    a second table gives each fold's validation images per bin."""
    from orchestrator.kfold.strata import strata_table

    from rich.console import Console
    from rich.table import Table

    classes = [c.get("name", str(c["id"])) for c in coco.get("categories", [])]
    table = Table(title=f"{len(folds)}-fold split: validation sets (per class: instances/images)")
    for header in ("fold", "images", "annotations", *classes):
        table.add_column(header, justify="right")
    rows = [(str(f.fold), fold_stats(coco, f.val_ids)) for f in folds]
    rows.append(("all", fold_stats(coco, tuple(img["id"] for img in coco["images"]))))
    for label, stats in rows:
        cells = [f"{stats['classes'][c][0]}/{stats['classes'][c][1]}" for c in classes]
        table.add_row(label, str(stats["images"]), str(stats["annotations"]), *cells)
    out = io.StringIO()
    Console(width=max(80, 24 + 14 * len(classes)), color_system=None, file=out).print(table)
    return out.getvalue() + strata_table(coco, folds, stratify)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _subset(coco: dict, ids: tuple[int, ...]) -> dict:
    """``coco`` restricted to the images ``ids`` (and their annotations); every other top-level
    key (info, licenses, categories, ...) is kept as it is."""
    wanted = set(ids)
    out = {key: value for key, value in coco.items() if key not in ("images", "annotations")}
    out["images"] = [img for img in coco["images"] if img["id"] in wanted]
    out["annotations"] = [a for a in coco.get("annotations", []) if a["image_id"] in wanted]
    out.setdefault("categories", [])
    return out


def write_folds(
    coco: dict,
    folds: list[FoldSplit],
    out_dir: Union[str, Path],
    ann_file: Union[str, Path, None] = None,
    seed: Optional[int] = None,
    group_key: Optional[str] = None,
    group_regex: Optional[str] = None,
    stratify: Sequence[str] = ("classes",),
) -> dict:
    """Write ``train_<k>.json`` / ``val_<k>.json`` for each fold and ``manifest.json`` into
    ``out_dir``; returns the manifest. The manifest holds the sha256 of every written file and of
    the source (``ann_file`` when given, else the canonical JSON of ``coco``), k, seed, grouping and
    what was stratified, so a later run can tell whether the folds on disk still match its inputs."""
    check_folds(coco, folds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ann_file is not None:
        source = {"path": str(Path(ann_file).resolve()), "sha256": file_sha256(Path(ann_file))}
    else:
        canonical = json.dumps(coco, sort_keys=True, separators=(",", ":")).encode()
        source = {"path": None, "sha256": hashlib.sha256(canonical).hexdigest()}
    entries = []
    for f in folds:
        entry: dict[str, Any] = {"fold": f.fold}
        for split, ids in (("train", f.train_ids), ("val", f.val_ids)):
            path = out / f"{split}_{f.fold}.json"
            subset = _subset(coco, ids)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(subset))
            tmp.replace(path)  # atomic: a reader never sees half a file
            entry[split] = {
                "file": path.name,
                "sha256": file_sha256(path),
                "images": len(subset["images"]),
                "annotations": len(subset["annotations"]),
            }
        entries.append(entry)
    manifest = {
        "version": 1,
        "k": len(folds),
        "seed": seed,
        "grouping": {"group_key": group_key, "group_regex": group_regex},
        "stratify": list(stratify),
        "source": source,
        "folds": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_folds(out_dir: Union[str, Path], manifest: Optional[dict] = None) -> dict:
    """Re-hash the fold files in ``out_dir`` against its ``manifest.json``; returns the manifest.
    Raises :class:`DataError` when a file is missing or changed since it was written."""
    out = Path(out_dir)
    if manifest is None:
        try:
            manifest = json.loads((out / "manifest.json").read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"no readable manifest.json in {out} ({err}); re-run orch split") from None
    for entry in manifest["folds"]:
        for split in ("train", "val"):
            path = out / entry[split]["file"]
            if not path.is_file() or file_sha256(path) != entry[split]["sha256"]:
                raise DataError(f"{path} is missing or changed since orch split wrote it; re-run orch split")
    return manifest


def read_folds(out_dir: Union[str, Path]) -> list[FoldSplit]:
    """The folds as written in ``out_dir`` (from the image ids of each ``train_<k>``/``val_<k>``
    file), so that :func:`check_folds` can check what is on disk, not only what was meant."""
    manifest = verify_folds(out_dir)
    folds = []
    for entry in manifest["folds"]:
        ids = {}
        for split in ("train", "val"):
            data = json.loads((Path(out_dir) / entry[split]["file"]).read_text())
            ids[split] = tuple(sorted(img["id"] for img in data["images"]))
        folds.append(FoldSplit(fold=entry["fold"], train_ids=ids["train"], val_ids=ids["val"]))
    return folds
