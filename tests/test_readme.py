"""Every shell example of README.md runs as written (issue 23): the ```bash blocks, in README
order, in one fresh folder (a copy of ``experiments/``, the Makefile and the package files, with
this checkout's ``.venv``), each command line on its own, failing on the first that fails.

What runs and what is only checked (``check``: the program exists and every ``--option`` of the
line is one its ``--help`` lists; ``make`` targets with ``make -n``):

- A block after ``<!-- readme-test: check -->`` is checked, line by line, except lines that say
  ``--dry-run`` (those run). The README puts it before blocks that need GPUs, several nodes, a
  Slurm or Ray cluster, a server, root or data only the reader has.
- In other blocks a line that asks for a cluster or GPUs (``--partition``, ``--backend
  slurm|ray|torchrun``, ``--address``, ``--hosts``, ``--node-rank``, ``--device cuda``, ``--gpus``
  above the 2 CPU slots here), a Ray search (``orch sweep`` without ``--dry-run``), a download
  (``orch weights fetch``), and
  ``make test`` / ``make faults`` (the suite itself), are checked the same way; every other line
  runs.

Kept to minutes (the test says so here, the README's readers do it with the knobs it documents):
``make demo`` runs with ``DEMO_TRAIN=40 DEMO_VAL=10 DEMO_FLAGS="--set schedule.iterations=8 ..."``;
the ``orch train/submit/kfold`` lines that run get ``--set schedule.iterations=4`` (and the eval
and checkpoint interval, 64 px images, no loader worker processes) appended, and ``orch data
shapes`` lines make at most :data:`DATA_CAP` images per split. The test prints its slowest lines
(``pytest -s``). Measured before the cap: 1104 s
(59 lines run, 52 checked) on the shared 2-core machine, other tests beside it; the fold-ensemble
block (600 + 200 images, five folds, four ensembles) was about half of it.

Placeholders of the README: ``JOB`` is the job the last ``orch submit`` printed, ``<set id>`` /
``<set id or folder>`` / ``<set dir>`` the set the last ``orch kfold`` printed. The reader's own
files are made as small stand-ins first: ``exp.yaml``, ``a.yaml``, ``b.yaml``, ``c.yaml``,
``big.yaml`` (the demo experiment under another name), ``my_detector.yaml`` (the README's own
YAML block, on ``experiments/shapes_demo.yaml`` as the README says for a CPU), a YOLO, a VOC and
a LabelMe export of 12 shapes images (``data/mine_yolo``, ``data/VOCdevkit/VOC2007``,
``data/labelme`` + ``classes.txt``), ``photos/``, ``shots/``, ``clip.mp4``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MARKER = "<!-- readme-test: check -->"
SHRINK = ["--set", "schedule.iterations=4", "--set", "eval.interval=4", "--set", "checkpoint.interval=4",
          "--set", "data.min_size=64", "--set", "data.max_size=64", "--set", "data.workers_per_gpu=0"]
DEMO_ENV = {"DEMO_TRAIN": "40", "DEMO_VAL": "10", "DEMO_FLAGS": " ".join(SHRINK).replace("=4", "=8")}
# `orch data shapes` lines make at most this many images per split (the fold-ensemble block's
# 600 + 200 images took half of the test's 18 minutes, for a 4-iteration training).
DATA_CAP = {"train": 60, "val": 16, "test": 20}
CPU_SLOTS = 2
CLUSTER = re.compile(r"--partition\b|--backend[ =](slurm|ray|torchrun)\b|--address\b|--hosts\b|--node-rank\b"
                     r"|--device[ =]cuda\b")


@dataclass(frozen=True)
class Command:
    """One command of a README block: its text, the README line, and whether it is only checked."""

    text: str
    line: int
    check_only: bool


def readme_commands(text: str) -> list[Command]:
    """The commands of README.md's ```bash blocks, in order (continuation lines joined, comment
    lines left out, ``a; b`` and ``a && b`` split)."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marked = before == MARKER
        i += 1
        logical, start = "", i
        while lines[i].strip() != "```":
            if not logical:
                start = i
            logical += lines[i].strip() if logical else lines[i].rstrip()
            if logical.endswith("\\"):
                logical = logical[:-1].rstrip() + " "
            else:
                if logical.strip() and not logical.lstrip().startswith("#"):
                    for part in re.split(r";\s+|\s+&&\s+", strip_comment(logical)):
                        out.append(Command(part.strip(), start + 1, marked and "--dry-run" not in part))
                logical = ""
            i += 1
        i += 1
    return out


def strip_comment(line: str) -> str:
    """``line`` without its trailing ``# comment`` (a ``#`` after a space, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i > 0 and line[i - 1].isspace():
            return line[:i].rstrip()
    return line


def needs_machine(command: str) -> bool:
    """A line that needs GPUs, a cluster, a Ray search or is the test suite itself."""
    words = command.split()
    if words[:2] in (["make", "test"], ["make", "faults"]) or words[:2] == ["make", "test-heavy"]:
        return True
    if words[:2] == ["orch", "sweep"] and "--dry-run" not in words:
        return True
    if words[:3] == ["orch", "weights", "fetch"]:  # a download ("once, with network")
        return True
    if CLUSTER.search(command) and "--dry-run" not in words:
        return True
    gpus = re.search(r"--gpus[ =](\d+)", command)
    return bool(words[:2] in (["orch", "submit"], ["orch", "kfold"], ["orch", "train"]) and gpus
                and int(gpus.group(1)) > CPU_SLOTS and "--dry-run" not in words)


def check(command: str, cwd: Path, env: dict) -> None:
    """The command exists and takes every option it is given (nothing starts)."""
    words = shlex.split(command)
    if words[0] == "make":
        done = subprocess.run(["make", "-n", *words[1:]], cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"make -n: {done.stderr}"
        return
    if words[0] in ("orch", "mlflow"):
        sub = [w for w in words[1:3] if not w.startswith("-") and re.fullmatch(r"[a-z][a-z-]*", w)]
        helps = ""
        for n in range(len(sub), -1, -1):  # `orch data check`, `orch weights list`, `mlflow server`
            done = subprocess.run([words[0], *sub[:n], "--help"], cwd=cwd, env=env, capture_output=True, text=True)
            if done.returncode == 0:
                helps = done.stdout
                break
        assert helps, f"{words[0]} {' '.join(sub)} --help failed"
        for option in (w.split("=")[0] for w in words if w.startswith("--")):
            assert re.search(rf"(^|[\s,/\[]){re.escape(option)}\b", helps), f"{option} is not an option of {sub}"
        return
    done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def make_stand_ins(folder: Path, env: dict) -> None:
    """The reader's own files, small (see the module docstring)."""
    import yaml

    from detection.shapes import make_shapes

    for name in ("exp", "a", "b", "c", "big"):
        (folder / f"{name}.yaml").write_text(f"_base_: experiments/shapes_demo.yaml\nname: {name}\n")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(# my_detector\.yaml.*?)```", readme, re.S).group(1)
    mapping = yaml.safe_load(block)
    mapping["_base_"] = "experiments/shapes_demo.yaml"  # "To try the whole flow on a CPU ..." (README)
    (folder / "my_detector.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))

    source = folder / "scratch"
    make_shapes(source, n_train=12, n_val=0, size=96, seed=1)
    coco = json.loads((source / "annotations" / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    order = sorted(names)
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    yolo, voc, labelme = folder / "data" / "mine_yolo", folder / "data" / "VOCdevkit" / "VOC2007", folder / "data" / "labelme"
    for sub in (yolo / "images", yolo / "labels", voc / "Annotations", voc / "JPEGImages", voc / "ImageSets" / "Main",
                labelme, folder / "photos", folder / "shots" / "day1"):
        sub.mkdir(parents=True)
    (yolo / "classes.txt").write_text("".join(names[i] + "\n" for i in order))
    (folder / "classes.txt").write_text("".join(names[i] + "\n" for i in order))
    ids = []
    for image in coco["images"]:
        src = source / "train" / image["file_name"]
        stem, w, h = Path(image["file_name"]).stem, image["width"], image["height"]
        anns = by_image.get(image["id"], [])
        for target in (yolo / "images", voc / "JPEGImages", labelme, folder / "photos"):
            shutil.copy(src, target / image["file_name"])
        from PIL import Image

        Image.open(src).convert("RGB").save(folder / "shots" / "day1" / f"{stem}.jpg")
        (yolo / "labels" / f"{stem}.txt").write_text("".join(
            f"{order.index(a['category_id'])} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
            f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} {a['bbox'][3] / h:.6f}\n" for a in anns))
        objects = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{a['bbox'][0] + 1:.0f}</xmin><ymin>{a['bbox'][1] + 1:.0f}</ymin>"
            f"<xmax>{a['bbox'][0] + a['bbox'][2]:.0f}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]:.0f}</ymax>"
            f"</bndbox></object>" for a in anns)
        (voc / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{image['file_name']}</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")
        ids.append(stem)
        (labelme / f"{stem}.json").write_text(json.dumps({
            "imagePath": image["file_name"], "imageWidth": w, "imageHeight": h,
            "shapes": [{"label": names[a["category_id"]], "shape_type": "rectangle",
                        "points": [[a["bbox"][0], a["bbox"][1]], [a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]]}
                       for a in anns]}))
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("".join(i + "\n" for i in ids))
    _write_video(folder / "clip.mp4", [source / "train" / im["file_name"] for im in coco["images"][:6]])
    shutil.rmtree(source)


def _write_video(path: Path, frames: list[Path]) -> None:
    import av
    import numpy as np
    from PIL import Image

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
        for frame in frames:
            pixels = np.asarray(Image.open(frame).convert("RGB"))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def fresh_folder(folder: Path) -> dict:
    """A copy of what a clone holds that the examples read, with this checkout's venv; the
    environment of the commands (PATH first to the venv, an isolated orch home)."""
    for name in ("experiments", "scripts"):
        shutil.copytree(ROOT / name, folder / name)
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, folder / name)
        os.utime(folder / name, (0, 0))  # older than the venv's install stamp: make reuses .venv
    (folder / ".venv").symlink_to(VENV_BIN.parent)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "ORCH_HOME": str(folder / ".orch"),
           "ORCH_RUNTIME_DIR": str(folder / ".orch-rt"), "ORCH_CPU_SLOTS": str(CPU_SLOTS), "OMP_NUM_THREADS": "1",
           **DEMO_ENV}
    env.pop("MASTER_PORT", None)
    env.pop("SLURM_CONF", None)
    return env


def prepare(command: str, seen: dict) -> str:
    """The line as run: placeholders filled, the training lines shortened (module docstring)."""
    for placeholder in ("<set id or folder>", "<set id>", "<set dir>"):
        if placeholder in command:
            assert "set" in seen, f"{command}: no orch kfold printed a set before it"
            command = command.replace(placeholder, seen["set"] if placeholder != "<set dir>" else seen["set_dir"])
    if re.search(r"\bJOB\b", command):
        assert "job" in seen, f"{command}: no orch submit printed a job before it"
        command = re.sub(r"\bJOB\b", seen["job"], command)
    words = command.split()
    if words[:2] in (["orch", "train"], ["orch", "submit"], ["orch", "kfold"]) and "--dry-run" not in words:
        command += " " + " ".join(SHRINK)
    if words[:3] == ["orch", "data", "shapes"]:  # the image counts capped: what runs on them is 4 iterations
        command = re.sub(r"(--(train|val|test)) (\d+)",
                         lambda m: f"{m.group(1)} {min(int(m.group(3)), DATA_CAP[m.group(2)])}", command)
    return command


def remember(output: str, seen: dict) -> None:
    """Job and set ids the command printed."""
    for job in re.findall(r"^submitted (\S+) ", output, re.M):
        seen["job"] = job
    for set_id, folder in re.findall(r"^set (\S+): .*report: (\S+)/report", output, re.M):
        seen["set"], seen["set_dir"] = set_id, folder


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_readme_examples_run_as_written(tmp_path):
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) > 50  # the README's examples were found
    env = fresh_folder(tmp_path)
    make_stand_ins(tmp_path, env)
    seen: dict = {}
    ran, checked = 0, 0
    took: list[tuple[float, int, str]] = []  # (seconds, README line, command) of each line run
    try:
        for command in commands:
            if command.check_only or needs_machine(command.text):
                check(command.text, tmp_path, env)
                checked += 1
                continue
            line = prepare(command.text, seen)
            started = time.monotonic()
            done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=900)
            took.append((time.monotonic() - started, command.line, command.text))
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"README.md line {command.line}: {line}\nexit {done.returncode}:\n{output[-3000:]}"
            remember(output, seen)
            ran += 1
    finally:  # jobs an example left running (submitted without --wait) end with the test
        subprocess.run([sys.executable, "-c", "from orchestrator.jobs import cancel_job, refresh_job\n"
                        "from orchestrator.records import list_records\n"
                        "for r in list_records():\n    refresh_job(r.job_id).state.finished or cancel_job(r.job_id)"],
                       cwd=tmp_path, env=env, timeout=300)
    print(f"README: {ran} commands run, {checked} checked; the slowest (s, README line):")
    for seconds, number, text in sorted(took, reverse=True)[:12]:
        print(f"{seconds:7.1f}  {number:4d}  {text[:100]}")


def test_readme_commands_are_found_and_classified():
    """Fast: the parser finds the blocks, joins continuations and splits compound lines; the
    cluster lines are told apart."""
    text = "\n".join([
        "```bash", "orch status; orch logs -f JOB   # follow", "orch predict e.yaml \\", "    a b --out p",
        "# a comment", "```", MARKER, "", "```bash", "orch submit e.yaml --partition dev",
        "orch submit e.yaml --backend slurm --dry-run", "```"])
    found = readme_commands(text)
    assert [(c.text, c.check_only) for c in found] == [
        ("orch status", False), ("orch logs -f JOB", False), ("orch predict e.yaml a b --out p", False),
        ("orch submit e.yaml --partition dev", True), ("orch submit e.yaml --backend slurm --dry-run", False)]
    assert needs_machine("orch submit a.yaml --gpus 4") and not needs_machine("orch submit a.yaml --gpus 2")
    assert needs_machine("orch sweep x.yaml") and not needs_machine("orch sweep x.yaml --dry-run")
    assert needs_machine("make test") and not needs_machine("make demo")
    assert not needs_machine("orch config x.yaml --gpus 4")
