"""What users see of orch's runs in the MLflow UI, in a real browser: a finished 2-fold k-fold
set and a 3-trial sweep, shipped to a real ``mlflow server``, rendered by headless Chromium
(Debian's, driven over the DevTools protocol) at the link orch prints.

MLflow 3.17's runs table shows a parent run as one row with an expand button; its children
appear under it once it is expanded (the test clicks it, as a user does). The UI opens an
experiment on its GenAI overview unless the link asks for the model-training view
(``?workflowType=...``; the experiment-kind tag is no longer read), so the links orch prints
ask for it. Screenshots go to the test's folder, and also to ``$ORCH_UI_SCREENSHOTS`` when set
(``ORCH_UI_SCREENSHOTS=docs/images`` refreshes the README's pictures).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from detection.journal import Journal
from orchestrator.cli import main as cli
from orchestrator.commands.report_util import mlflow_ui_hint
from orchestrator.tracking.cursor import Cursor, load_cursor, save_cursor
from orchestrator.tracking.runs import ui_url, wait_shipped
from orchestrator.tracking.sync import find_journals

WIDTH, HEIGHT = 1600, 1000
# The expand button of a parent row in the runs table (MLflow 3.17's run-name cell).
EXPANDER = 'button[data-component-id$="runnamecellrenderer.tsx_46"]'
GENAI_ONLY = ("Overview", "Sessions", "Judges")  # side-navigation entries of the GenAI view
COLUMN_SELECTOR = 'button[data-component-id$="experimentviewrunscolumnselector.tsx_315"]'
# The default columns the pictures hide (empty here) for those a user compares.
HIDE_COLUMNS = ("Dataset", "Source", "Models")
SHOT_HEIGHT = 420  # the pictures keep the top of the page: the table, not the empty space below


class Browser:
    """Headless Chromium driven over the Chrome DevTools protocol (aiohttp's websocket client:
    a dependency of mlflow): open a page, read its text, click, take a screenshot."""

    def __init__(self, executable: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="orch-chromium-")
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"  # Chromium writes its port here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n")):
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._connect())
        self.calls = 0

    async def _connect(self) -> None:
        import aiohttp

        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{self.port}/json/list") as response:
            page = next(t for t in await response.json() if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _call(self, method: str, params: dict) -> dict:
        self.calls += 1
        await self.ws.send_json({"id": self.calls, "method": method, "params": params})
        while True:  # events (none asked for) and answers to other calls are skipped
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def call(self, method: str, **params: Any) -> dict:
        return self.loop.run_until_complete(self._call(method, params))

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        """Load ``url`` afresh (a blank page first: a link that differs only after ``#`` would
        otherwise not reload the app)."""
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_text(self, *needles: str, timeout_s: float = 90) -> str:
        """The page's text once it shows every one of ``needles`` (the React app renders late)."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            assert time.monotonic() < deadline, f"the page never showed {needles}; it shows:\n{text[:3000]}"
            time.sleep(0.25)

    def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def screenshot(self, path: Path, height: int = HEIGHT) -> Path:
        clip = {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png", clip=clip)["data"]))
        return path

    def close(self) -> None:
        self.loop.run_until_complete(self.ws.close())
        self.loop.run_until_complete(self.http.close())
        self.loop.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(chromium):
    page = Browser(chromium)
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(autouse=True)
def _no_stray_shippers(tmp_path, reap_shippers):
    yield
    reap_shippers(tmp_path)


def printed_link(output: str, prefix: str) -> str:
    """The URL on the line of ``output`` that starts with ``prefix`` (what a user clicks)."""
    [line] = [line.strip() for line in output.splitlines() if line.strip().startswith(prefix)]
    return line[len(prefix):].split()[0]


def wait_all_shipped(folder: Path, uri: str) -> None:
    """Every run journal under ``folder`` delivered its final status to ``uri`` (the shippers
    beside the jobs and the set or sweep driver do it; nothing is synced by hand here)."""
    for journal in find_journals([str(folder)]):
        assert wait_shipped(journal, uri, 300), f"{journal} was not shipped"
        assert load_cursor(journal, uri).status == "FINISHED", journal


def pick_columns(browser: Browser, show: tuple[str, ...]) -> list[str]:
    """Toggle ``HIDE_COLUMNS`` off and the metrics and params ``show`` on in the table's column
    selector, as a user does; returns the column ids the table then shows."""
    browser.js(f"document.querySelector('{COLUMN_SELECTOR}').click()")
    for name in HIDE_COLUMNS + show:
        clicked = None
        for _ in range(40):  # the selector's list renders late
            clicked = browser.js(f"""(() => {{
                const [entry] = [...document.querySelectorAll('[role="dialog"] *')]
                    .filter(e => e.children.length === 0 && e.textContent.trim() === {name!r});
                if (entry) entry.click();
                return Boolean(entry); }})()""")
            if clicked:
                break
            time.sleep(0.25)
        assert clicked, f"no column {name!r} in the column selector"
        time.sleep(0.5)
    browser.key("Escape", 27)
    browser.js("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
    time.sleep(0.5)
    return browser.js("[...document.querySelectorAll('.ag-header-cell')].map(h => h.getAttribute('col-id'))")


def look_at_runs(browser: Browser, link: str, parent: str, children: list[str], shot: Path,
                 columns: tuple[str, ...]) -> str:
    """Open the link orch printed and check what a user sees: the runs table of the experiment
    in the model-training view, the parent row with its children hidden, then (expanded) the
    children under it. Saves the expanded table's screenshot, with ``columns`` (metrics and
    params) shown; returns the page text."""
    browser.open(link)
    text = browser.wait_text(parent, f"{len(children) + 1} matching runs")
    assert "#/experiments/" in browser.js("location.hash") and "/runs" in browser.js("location.hash")
    assert not [entry for entry in GENAI_ONLY if entry in text.splitlines()], "the GenAI view, not the runs table"
    assert not [name for name in children if name in text]  # nested: hidden under the parent
    assert browser.js(f"document.querySelectorAll('{EXPANDER}').length") == 1  # one parent row with children
    browser.js(f"document.querySelector('{EXPANDER}').click()")
    text = browser.wait_text(*children)
    lines = text.splitlines()
    assert lines.index(parent) < min(lines.index(name) for name in children)  # the children under it
    shown = pick_columns(browser, columns)
    missing = [c for c in columns if not any(f"`{c}`" in s for s in shown)]
    assert not missing and len(shown) == 4 + len(columns), shown  # checkbox, name, created, duration + those
    close = browser.js("(() => { const b = document.querySelector('[aria-label=\"Close\"]'); if (b) b.click(); "
                       "return Boolean(b); })()")  # the assistant panel, for a wider table
    if close:
        time.sleep(1.0)
    browser.screenshot(shot, SHOT_HEIGHT)
    if os.environ.get("ORCH_UI_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["ORCH_UI_SCREENSHOTS"]) / shot.name)
    return text


def experiments_listed(browser: Browser, uri: str) -> set[str]:
    """The experiment names the UI's experiments page lists."""
    browser.open(f"{uri}/#/experiments")
    browser.wait_text("Default")
    return set(browser.js("[...document.querySelectorAll('a[href*=\"/experiments/\"]')]"
                          ".map(a => a.textContent.trim()).filter(t => t)"))


def test_the_link_orch_prints_asks_for_the_training_view(tmp_path):
    """A bare experiment link opens MLflow 3.17 on its GenAI overview: orch's links name the
    runs table and the model-training view, once the run's experiment is known."""
    assert ui_url("http://mlflow.lab:5000/", "7") == "http://mlflow.lab:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_url("http://mlflow.lab:5000") == "http://mlflow.lab:5000"
    assert ui_url("sqlite:////data/mlflow.db", "3").startswith("http://127.0.0.1:5000/#/experiments/3/runs?")
    # a k-fold set's link: that set's runs, oldest first (its parents lead the first page of 100)
    assert ui_url("http://mlflow.lab:5000", "7", kfold_set="3f2a9c01bd") == (
        "http://mlflow.lab:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&searchFilter=tags.%60orch.kfold_set%60%20%3D%20%273f2a9c01bd%27"
        "&orderByKey=attributes.start_time&orderByAsc=true")
    journal = Journal.create(tmp_path / "journal", "exp", "run")
    uri = "http://mlflow.lab:5000"
    assert mlflow_ui_hint(uri, None, journal.folder) == "view it: open http://mlflow.lab:5000"  # not shipped yet
    save_cursor(journal.folder, Cursor(uri, run_id="abc", experiment_id="4"))
    assert mlflow_ui_hint(uri, "abc", journal.folder) == (
        "view it: open http://mlflow.lab:5000/#/experiments/4/runs?workflowType=machine_learning   (run abc)")
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    save_cursor(journal.folder, Cursor(sqlite, run_id="abc", experiment_id="1"))
    assert mlflow_ui_hint(sqlite, "abc", journal.folder).startswith(
        f"view it: mlflow ui --backend-store-uri {sqlite}, then open http://127.0.0.1:5000/#/experiments/1/runs?")


@pytest.mark.slow
def test_a_kfold_set_in_the_mlflow_ui(make_experiment, local_orch_env, own_server, browser, tmp_path, capsys):
    path = make_experiment(name="shapes", **{"kfold.folds": 2, "kfold.allow_small_classes": True,
                                             "tracking.uri": own_server.uri, "tracking.experiment": None})
    assert cli(["kfold", str(path), "--backend", "local"]) == 0
    output = capsys.readouterr().out
    link = printed_link(output, "view it: open ")
    wait_all_shipped(tmp_path / "work", own_server.uri)
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(own_server.uri).get_experiment_by_name("shapes").experiment_id
    set_id = link.split("%27")[1]  # the set's runs only (see ui_url)
    assert link == ui_url(own_server.uri, experiment, kfold_set=set_id) and f"k-fold set {set_id}:" in output
    look_at_runs(browser, link, "shapes k-fold", ["fold-0", "fold-1"], tmp_path / "mlflow_kfold.png",
                 ("bbox_mAP", "mean/bbox_mAP", "std/bbox_mAP", "optim.lr"))
    assert experiments_listed(browser, own_server.uri) == {"shapes", "Default"}  # Default: MLflow's own, empty


@pytest.mark.slow
def test_a_sweep_in_the_mlflow_ui(make_experiment, local_orch_env, own_server, browser, tmp_path, capsys):
    sweep = {"space": {"optim.lr": {"grid": [3.0e-3, 1.0e-3, 3.0e-4]}}, "metric": "loss", "mode": "min",
             "max_concurrent": 3, "cpus_per_trial": 0.5, "scheduler": {"type": "fifo"}}
    path = make_experiment(name="shapes", sweep=sweep, **{"eval.classwise": False, "tracking.uri": own_server.uri,
                                                          "tracking.experiment": None})
    assert cli(["sweep", str(path)]) == 0  # a private Ray head, followed to the end
    link = printed_link(capsys.readouterr().out, "view it: open ")
    wait_all_shipped(tmp_path / "work", own_server.uri)
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(own_server.uri).get_experiment_by_name("shapes").experiment_id
    assert link == ui_url(own_server.uri, experiment)
    trials = ["trial 1: lr=0.003", "trial 2: lr=0.001", "trial 3: lr=0.0003"]
    look_at_runs(browser, link, "shapes sweep", trials, tmp_path / "mlflow_sweep.png", ("bbox_mAP", "optim.lr"))
    assert experiments_listed(browser, own_server.uri) == {"shapes", "Default"}
