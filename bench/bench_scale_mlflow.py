"""MLflow at a study's scale: a k-fold grid set of ``--points`` x ``--folds`` trials (2 training
iterations each, the tiny shapes model) on the local backend, tracked into a real ``mlflow
server`` backed by a private PostgreSQL (``--store postgres``, Debian's ``postgresql``) or by
SQLite (``--store sqlite``), both started here on 127.0.0.1 at ports chosen at run time and
stopped after, or straight into a SQLite file (``--store sqlite-file``: no server; the store's
"database is locked" answers, retried by the shipper, are counted from its log).

Measured: the set's wall time; the shipper processes that ran (at most one at a time is the
design: one per host, never one MLflow import per trial) and their CPU seconds (each host shipper
logs its own at exit), per trial; the server's CPU seconds; runs shipped per second (runs over
the set's time plus the shipping after it); how long after the set ended everything was shipped.
Checked: one experiment holding every run, each fold under its grid point and each point under
the grid parent, nothing RUNNING, every shipper gone at the end; ``--browser``: the runs page
opened in headless Chromium at the link ``orch kfold`` printed shows the grid parent as the one
parent row (timed from the link's navigation), its points once expanded, and the first point's
folds once that point is expanded ("Load more" clicked until they are loaded: 100 runs a page);
the first point's run page lists its folds ("Child runs").

    .venv/bin/python bench/bench_scale_mlflow.py --points 100 --folds 2 --browser   # 200 trials
    .venv/bin/python bench/bench_scale_mlflow.py --points 10 --folds 2 --store sqlite-file

``--synthetic``: the same set, everything but the training (1000 trials in minutes; each real
trial is a torch process training 2 iterations, ~12 s of this machine). Real: the set planned,
its parent runs and every trial's journal and config made by orch's own functions in
``run_kfold``'s order; each trial's journal lines written by training's own hooks
(``JournalHook``, ``SystemMetricsHook``) and ended as a job's end does; the report and the
parents' metrics and end (``log_summaries``); the host shipper (started by orch as the jobs start
it), the server, the store, the browser. Stood in for: the trainer (made-up losses and mAPs,
no model or data), each fold's COCO evaluation, and the job processes (one process writes the
trials one after another; a trial's training-curves picture is not drawn). See
``bench/synthetic_kfold.py``.

    .venv/bin/python bench/bench_scale_mlflow.py --synthetic --points 200 --folds 5 --browser   # 1000 trials

A JSON summary goes to stdout's last line (and ``--out FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "orchestrator" / "tracking")]

SHIPPER_MARKS = ("orchestrator.tracking.shipper",)  # the host shipper runs as `shipper --host`
VIEWPORT = "document.querySelector('.ag-body-viewport')"  # the runs table's scrolled part


class ShipperWatch:
    """Samples /proc every ``poll_s``: shipper processes whose environment has ``ORCH_HOME=home``
    (pids seen, most at once)."""

    def __init__(self, home: Path, poll_s: float = 0.5) -> None:
        self.home, self.poll_s = str(home), poll_s
        self.seen: set[int] = set()
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def alive(self) -> list[int]:
        from orch_testing import processes_with_env

        return [pid for pid, argv in processes_with_env("ORCH_HOME", self.home)
                if any(mark in argv for mark in SHIPPER_MARKS)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = self.alive()
            self.seen.update(pids)
            self.most = max(self.most, len(pids))
            self._stop.wait(self.poll_s)

    def __enter__(self) -> "ShipperWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def busy_retries(home: Path) -> int:
    """How many store calls the shippers retried because the store was busy ("database is locked")."""
    return sum(log.read_text().count(" busy (") for log in home.glob("shipping/*/shipper.log"))


def shipper_cpu(home: Path) -> tuple[int, float]:
    """(host shipper runs that exited, their CPU seconds) from the shippers' logs."""
    runs, cpu = 0, 0.0
    for log in home.glob("shipping/*/shipper.log"):
        for found in re.finditer(r"journal\(s\) shipped, ([0-9.]+) CPU-s\); exiting", log.read_text()):
            runs, cpu = runs + 1, cpu + float(found.group(1))
    return runs, cpu


def learning_rates(points: int) -> list[float]:
    """The grid's values (one per point)."""
    return [round(1e-4 * (i + 1), 6) for i in range(points)]


def experiment_yaml(folder: Path, uri: str, points: int, folds: int, iterations: int) -> Path:
    """The tiny shapes experiment as a k-fold grid set of ``points`` learning rates."""
    import yaml

    from detection.shapes import make_shapes
    from orch_testing import root_conftest

    data = folder / "shapes"
    make_shapes(data, n_train=16, n_val=8, size=64, seed=0)
    mapping = root_conftest().tiny_experiment_dict(data, folder / "work", uri)
    mapping["name"] = "scale"
    mapping["schedule"]["iterations"] = iterations
    mapping["eval"].update(interval=iterations, classwise=False)
    mapping["checkpoint"].update(interval=iterations, save_best=None)
    mapping["tracking"]["experiment"] = "scale"
    mapping["kfold"] = {"folds": folds, "allow_small_classes": True}
    mapping["grid"] = {"optim.lr": learning_rates(points)}
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def check_runs(uri: str, points: int, folds: int) -> dict[str, Any]:
    """Read every run back: one experiment; grid parent -> points -> folds; statuses."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=50000) if experiments else []
    by_id = {r.info.run_id: r for r in runs}
    kinds: dict[str, list] = {}
    for run in runs:
        kinds.setdefault(run.data.tags.get("orch.kind", "fold"), []).append(run)
    grid = kinds.get("kfold-grid", [])
    parent = lambda r: r.data.tags.get("mlflow.parentRunId")  # noqa: E731
    problems = []
    if len(experiments) != 1:
        problems.append(f"{len(experiments)} experiments: {[e.name for e in experiments]}")
    if len(grid) != 1:
        problems.append(f"{len(grid)} grid parents")
    points_ok = [p for p in kinds.get("kfold-point", []) if grid and parent(p) == grid[0].info.run_id]
    folds_ok = [f for f in kinds.get("fold", []) if parent(f) in {p.info.run_id for p in points_ok}]
    if len(points_ok) != points or len(folds_ok) != points * folds:
        problems.append(f"{len(points_ok)} of {points} points under the grid parent, {len(folds_ok)} of "
                        f"{points * folds} folds under a point")
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run.info.status] = statuses.get(run.info.status, 0) + 1
    if set(statuses) != {"FINISHED"}:
        problems.append(f"statuses {statuses}")
    missing_parent = [r.info.run_name for r in runs if parent(r) and parent(r) not in by_id]
    if missing_parent:
        problems.append(f"{len(missing_parent)} runs whose parent is not in the experiment")
    return {"experiments": len(experiments), "runs": len(runs), "statuses": statuses,
            "experiment_id": experiments[0].experiment_id if experiments else None, "problems": problems}


def look_in_browser(link: str, grid_name: str, point_names: list[str], folds: int,
                    point_page: Optional[str] = None, seen: Optional[dict[str, Any]] = None) -> list[str]:
    """Open the printed link in headless Chromium and look as a user does: the runs table shows
    the grid parent as its one expandable row (``seen["parent_row_s"]``: seconds from the link's
    navigation); expanded, point rows under it (at least 3 of ``point_names``); the first point
    row shown, expanded, its ``folds`` fold rows. Then ``point_page`` (the run page of
    ``point_names[0]``): its "Child runs" box names that point's folds. Returns problems (empty:
    as expected); ``seen`` also gets the other timings and, when the table was not as expected,
    the top of the page's text."""
    import shutil

    from test_mlflow_ui import Browser

    chromium = shutil.which("chromium")
    if not chromium:
        return ["chromium is not installed (apt-get install chromium)"]
    seen = {} if seen is None else seen
    fold_names = lambda point: [f"{point}/fold-{k}" for k in range(folds)]  # noqa: E731
    problems: list[str] = []
    browser = Browser(chromium)
    try:
        started = time.monotonic()
        browser.open(link)
        try:
            problems += _look_at_table(browser, grid_name, point_names, fold_names, started, seen)
        except AssertionError as err:
            problems.append(str(err)[:300])
            seen["table_text"] = browser.text()[:1500]
        if point_page:
            started = time.monotonic()
            browser.open(point_page)
            try:
                browser.wait_text("Child runs", *fold_names(point_names[0]), timeout_s=180)
                seen["point_page_folds_s"] = round(time.monotonic() - started, 2)
            except AssertionError as err:
                problems.append(f"the run page of {point_names[0]}: {str(err)[:300]}")
        return problems
    finally:
        browser.close()


def _look_at_table(browser: Any, grid_name: str, point_names: list[str], fold_names, started: float,
                   seen: dict[str, Any]) -> list[str]:
    """The runs table's part of :func:`look_in_browser` (an AssertionError: something never showed)."""
    from test_mlflow_ui import EXPANDER

    browser.wait_text(grid_name, timeout_s=180)
    seen["parent_row_s"] = round(time.monotonic() - started, 2)
    rows = browser.js(f"document.querySelectorAll('{EXPANDER}').length")
    if rows != 1:
        seen["table_text"] = browser.text()[:1500]
        return [f"{rows} expandable parent rows before expanding, not 1"]
    browser.js(f"document.querySelector('{EXPANDER}').click()")
    started = time.monotonic()
    wanted = min(3, len(point_names))
    while len(shown := [n for n in point_names if n in browser.text().splitlines()]) < wanted:
        assert time.monotonic() - started < 180, f"{len(shown)} point rows shown once the grid was expanded"
        time.sleep(0.25)
    seen["points_shown_s"] = round(time.monotonic() - started, 2)
    seen["point_rows_shown"] = len(shown)
    first = shown[0]
    if [name for name in fold_names(first) if name in browser.text()]:
        return [f"folds of {first} shown before it was expanded"]
    started, clicks = time.monotonic(), 0
    while not _expand_row(browser, first):
        # Its folds are not among the runs loaded yet (100 a page): load more, as a user does.
        if clicks == 20 or not _load_more(browser):
            return [f"the point row {first!r} has no expand button once the grid is expanded "
                    f"(after {clicks} clicks on Load more)"]
        clicks += 1
    seen["load_more_clicks"] = clicks
    browser.wait_text(*fold_names(first), timeout_s=180)
    seen["folds_shown_s"] = round(time.monotonic() - started, 2)
    return []


def _expand_row(browser: Any, name: str) -> bool:
    """Click the expand button of the row whose run-name cell reads ``name``, scrolling the table
    from its top (it renders only the rows near the visible ones); False: no such button."""
    from test_mlflow_ui import EXPANDER

    click = f"""(() => {{
        const cell = [...document.querySelectorAll('.ag-row [col-id]')].find(c =>
            c.querySelector('{EXPANDER}') && c.innerText.trim().split('\\n').includes({name!r}));
        if (!cell) return false;
        cell.querySelector('{EXPANDER}').click();
        return true; }})()"""
    height = browser.js(f"{VIEWPORT}.scrollHeight") or 0
    step = max(200, browser.js(f"{VIEWPORT}.clientHeight") or 0)
    for top in range(0, height + step, step):
        browser.js(f"{VIEWPORT}.scrollTop = {top}")
        time.sleep(0.3)
        if browser.js(click):
            return True
    return False


def _load_more(browser: Any, timeout_s: float = 120) -> bool:
    """Scroll to the table's end, click its "Load more" and wait for its "N matching runs" to
    grow; False: no button came, or nothing more."""
    def loaded() -> int:
        found = re.search(r"(\d+) matching runs", browser.text())
        return int(found.group(1)) if found else 0

    before = loaded()
    click = """(() => { const b = [...document.querySelectorAll('button')].find(b =>
        b.innerText.trim() === 'Load more'); if (b) b.click(); return Boolean(b); })()"""
    deadline = time.monotonic() + timeout_s
    while True:
        browser.js(f"{VIEWPORT}.scrollTop = {VIEWPORT}.scrollHeight")
        if browser.js(click):
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    while loaded() <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def point_page(uri: str, experiment_id: Optional[str], name: str) -> Optional[str]:
    """The MLflow UI's page of the run named ``name`` (a grid point's parent run)."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(uri).search_runs([experiment_id], f"attributes.run_name = '{name}'") if experiment_id else []
    return f"{uri}/#/experiments/{experiment_id}/runs/{found[0].info.run_id}" if found else None


def process_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` and its children so far (the server's uvicorn worker)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    except psutil.Error:
        pass
    return round(total, 2)


def run_scale(folder: Path, points: int, folds: int, iterations: int = 2, store: str = "postgres",
              max_parallel: int = 2, browser: bool = False, synthetic: bool = False, echo=print) -> dict[str, Any]:
    """The whole measurement in ``folder`` (servers stopped after); returns the summary.
    ``synthetic``: the set made by ``synthetic_kfold.py`` (training stood in for), not ``orch kfold``."""
    from orchestrator.kfold.expand import format_value
    from pg_helpers import Postgres
    from ship_helpers import MlflowServer

    pg: Optional[Postgres] = Postgres() if store == "postgres" else None
    server: Optional[MlflowServer] = None
    (folder / "server").mkdir(parents=True, exist_ok=True)
    home = folder / "home"
    result: dict[str, Any] = {"points": points, "folds": folds, "trials": points * folds, "iterations": iterations,
                              "store": store, "max_parallel": max_parallel, "synthetic": synthetic}
    try:
        if pg is not None:
            pg.start()
        if store == "sqlite-file":
            uri = f"sqlite:///{folder / 'server' / 'mlflow.db'}"
        else:
            server = MlflowServer(folder / "server", store=pg.uri if pg else None)
            server.start()
            uri = server.uri
        path = experiment_yaml(folder, uri, points, folds, iterations)
        env = dict(os.environ, ORCH_HOME=str(home), ORCH_RUNTIME_DIR=str(folder / "rt"), ORCH_CPU_SLOTS="2",
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'wrong.db'}")
        env.pop("MASTER_PORT", None)
        command = ([sys.executable, str(REPO / "bench" / "synthetic_kfold.py"), str(path)] if synthetic else
                   [sys.executable, "-m", "orchestrator.cli", "kfold", str(path), "--backend", "local"])
        server_cpu = process_cpu_s(server.proc.pid) if server is not None else None
        with ShipperWatch(home) as watch:
            started = time.monotonic()
            done = subprocess.run([*command, "--max-parallel", str(max_parallel)], env=env, cwd=folder,
                                  capture_output=True, text=True, timeout=6 * 3600)
            result["set_s"] = round(time.monotonic() - started, 1)
            if done.returncode != 0:
                raise RuntimeError(f"{command[1]} failed ({done.returncode}): "
                                   f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
            echo(f"set of {points * folds} trials done in {result['set_s']} s; waiting for the shipper")
            deadline = time.monotonic() + 900
            while watch.alive() and time.monotonic() < deadline:
                time.sleep(0.5)
            result["shipped_after_set_s"] = round(time.monotonic() - started - result["set_s"], 1)
            result["shippers_left"] = watch.alive()
        result["shipper_pids"] = len(watch.seen)
        result["shippers_at_once"] = watch.most
        runs, cpu = shipper_cpu(home)
        result["host_shipper_runs"], result["shipper_cpu_s"] = runs, round(cpu, 2)
        result["shipper_cpu_s_per_trial"] = round(cpu / (points * folds), 4)
        if server is not None:
            result["server_cpu_s"] = round(process_cpu_s(server.proc.pid) - server_cpu, 2)
        result["busy_retries"] = busy_retries(home)
        result.update(check_runs(uri, points, folds))
        result["runs_shipped_per_s"] = round(result["runs"] / (result["set_s"] + result["shipped_after_set_s"]), 1)
        result["wrong_store_written"] = (folder / "wrong.db").exists()
        if synthetic:
            from orchestrator.tracking.runs import run_id_of, ui_hint

            made = json.loads(done.stdout.strip().splitlines()[-1])
            result["set_parts_s"] = {k: made[k] for k in ("planned_s", "identified_s", "trained_s")}
            hint = ui_hint(uri, run_id_of(made["top_journal"], uri), made["top_journal"], made["set_id"]) or ""
        else:
            hint = next((line for line in done.stdout.splitlines() if "view it: open " in line), "")
        if browser and server is not None:
            link = hint.split("view it: open ", 1)[1].split()[0] if "view it: open " in hint else None
            names = [f"lr={format_value(lr)}" for lr in learning_rates(points)]
            page = point_page(uri, result["experiment_id"], names[0])
            seen: dict[str, Any] = {}
            result["browser_problems"] = (look_in_browser(link, "scale grid", names, folds, page, seen) if link
                                          else [f"no link to the experiment's runs (printed: {hint!r})"])
            result["browser"] = seen
    finally:
        if server is not None:
            server.stop()
        if pg is not None:
            pg.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--store", choices=("postgres", "sqlite", "sqlite-file"), default="postgres")
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--browser", action="store_true", help="also open the experiment page in headless Chromium")
    parser.add_argument("--synthetic", action="store_true",
                        help="everything but the training: the set's journals written by training's hooks, no model")
    parser.add_argument("--out", default=None, help="write the JSON summary here too")
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-scale-mlflow-") as tmp:
        result = run_scale(Path(tmp), args.points, args.folds, args.iterations, args.store, args.max_parallel,
                           args.browser, args.synthetic)
    result["loadavg_before"] = [round(x, 2) for x in load]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if not result["problems"] and not result.get("browser_problems") and not result["shippers_left"] else 1


if __name__ == "__main__":
    sys.exit(main())
