"""Jobs (``orch submit --backend local``) against a real ``mlflow server`` that goes away, as
users meet it: the server stops mid-run for a minute, or from before the end of training until
5 minutes after it; it is never reachable (``tracking.mode: offline``, ``orch sync`` later); the
training process is killed -9 and resumed; a job is cancelled, another fails before training.
The job's outcome is always the training's, and once the server answers every logged value is
there once. MLflow's HTTP retries stay at their defaults (minutes), as users run them.

All in one test, :func:`test_jobs_through_server_outages`: the two outages take over 5 minutes
of waiting (idle: sleeps), so they run in the background (:class:`Outages`) while the other
scenarios' jobs use the machine, and are checked last. One test rather than a module fixture
shared by several tests: under pytest-xdist a module's tests may land on different workers,
each of which would start the outages again.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from cluster.files import read_json
from detection.journal import TERMINAL, last_status, last_steps, read_entries, read_events
from orchestrator.cli import main as cli
from orchestrator.jobs import JobHandle
from orchestrator.records import list_records, load_record
from orchestrator.spec import JobState
from orchestrator.tracking.cursor import load_cursor
from orchestrator.tracking.runs import journal_dir, reachable, wait_shipped
from orch_testing import fifo_dataset
from ship_helpers import REPO, MlflowServer, _free_port, values_of

# 60 steps of the tiny model (seconds): every step logged, a durable journal flush at each
# checkpoint (every 10 steps), one evaluation at the end.
ITERS = {"schedule.iterations": 60, "runtime.log_interval": 1, "checkpoint.interval": 10, "eval.interval": 60,
         "eval.classwise": False}
OUTAGE_S = 60  # (a) the server is down this long, from mid-run
AFTER_END_S = 300  # (b) the server comes back this long after the job ended


def journal_history(folder: str) -> dict[str, list]:
    """{key: sorted [(step, timestamp, value)]} of every metric value in a journal: what MLflow
    must hold once shipped (``values_of`` reads the same shape from a server)."""
    history: dict[str, list] = {}
    for event in read_events(folder)[0]:
        if event.get("t") == "metrics":
            for ts, step, values in event["v"]:
                for key, value in values.items():
                    history.setdefault(key, []).append((step, ts, value))
    return {key: sorted(rows) for key, rows in history.items()}


def shipped_steps(folder: str, uri: str) -> int:
    """How many metric lines of the journal holding training values are shipped to ``uri`` (the
    cursor is past them). The system metrics' first sample precedes the first step: a line of
    ``system/...`` values alone is no sign that the job has trained."""
    offset = load_cursor(folder, uri).offset
    return sum(1 for e in read_entries(folder)[0]
               if e.end <= offset and (e.event or {}).get("t") == "metrics" and _trained(e.event))


def _trained(event: dict) -> bool:
    return any(not key.startswith("system/") for _, _, values in event["v"] for key in values)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    """Sleep-poll ``condition`` (idle: the machine's cores go to the jobs)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(poll_s)


def submit(path: Path, *overrides: str, check_data: bool = True) -> str:
    """``orch submit PATH --backend local [--set ...]``; returns the new job's id."""
    before = {r.job_id for r in list_records()}
    args = ["submit", str(path), "--backend", "local"] + ([] if check_data else ["--no-data-check"])
    for override in overrides:
        args += ["--set", override]
    assert cli(args) == 0
    [job_id] = [r.job_id for r in list_records() if r.job_id not in before]
    return job_id


def wait_job(job_id: str, state: JobState, timeout_s: float = 600) -> object:
    """Wait for the job to end; it must end in ``state``. Returns its record."""
    ended = JobHandle(job_id).wait(timeout_s)
    record = load_record(job_id)
    assert ended == state, f"{job_id}: {ended} ({record.error})\n" + Path(record.log_path).read_text()[-3000:]
    return record


class HeldImage:
    """One training image of a job served through a named pipe (:func:`orch_testing.fifo_dataset`)
    by a thread of the test: the job's data loader reads it in the training process, once per
    epoch. Each read is served at once until ``hold_when()`` is true when the reader arrives; that
    read is held (training waits inside it) until :meth:`release`, which serves it and puts the
    plain file in the pipe's place. No code in the product: training blocks in a file read, as on
    a slow file system."""

    def __init__(self, fifo: Path, image: bytes, hold_when: Callable[[], bool]) -> None:
        self.fifo, self.image, self.hold_when = fifo, image, hold_when
        self.held = threading.Event()  # a reader waits in the held read
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.released.set()
        self.thread.join(10)

    def _serve(self) -> None:
        plain = self.fifo.parent.parent / f"plain-{self.fifo.name}"
        plain.write_bytes(self.image)
        while True:
            fd = self._reader()
            if fd is None:  # released while no read was waiting
                os.replace(plain, self.fifo)
                return
            try:
                last = self.hold_when()
                if last:
                    self.held.set()
                    self.released.wait()
                with open(fd, "wb", closefd=False) as pipe:
                    pipe.write(self.image)
                if last or self.released.is_set():
                    os.replace(plain, self.fifo)  # before EOF: the reader's next open finds the file
                    return
            except BrokenPipeError:  # the reader went away (its job was stopped)
                pass
            finally:
                os.close(fd)

    def _reader(self) -> int | None:
        """The pipe opened for writing once a reader has it open (a non-blocking open fails with
        ENXIO until then); None once released with no reader waiting."""
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
                if self.released.is_set():  # after a last try: a reader that came meanwhile is served
                    return None
                time.sleep(0.02)
                continue
            os.set_blocking(fd, True)
            return fd


class Outages:
    """Two jobs, each with a server of its own: (a) the server stops mid-run and is back 60 s
    later; (b) it stops mid-run and is back 5 minutes after the job ended. :meth:`start` starts
    the servers and submits the jobs (``orch submit`` in a subprocess with an ``ORCH_HOME`` and
    CPU pool of their own); one thread per job drives its server; what they saw is in ``notes``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.home = folder / "home"
        self.servers = {name: MlflowServer(self._made(folder / f"server-{name}")) for name in "ab"}
        self.jobs: dict[str, str] = {}
        self.images: dict[str, HeldImage] = {}
        self.notes: dict[str, dict] = {"a": {}, "b": {}}
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        # Set by stop(): a scenario thread never restarts a server after the test has ended (a
        # failed test would otherwise leave a server started minutes after its teardown).
        self.closing = threading.Event()

    @staticmethod
    def _made(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def output_dir(self, name: str) -> Path:
        return self.folder / "work" / name

    def journal(self, name: str) -> str:
        return journal_dir(str(self.output_dir(name)))

    def start(self, make_experiment: Callable[..., Path], shapes_data: Path) -> None:
        with ThreadPoolExecutor(len(self.servers)) as pool:  # ~10 s each: at once
            list(pool.map(MlflowServer.start, self.servers.values()))
        env = dict(os.environ, ORCH_HOME=str(self.home), ORCH_RUNTIME_DIR=str(self.folder / "rt"), ORCH_CPU_SLOTS="2",
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        env.pop("MASTER_PORT", None)
        for name, server in self.servers.items():
            data = self._held_data(name, shapes_data)
            path = make_experiment(_name=f"outage-{name}.yaml", name=f"outage-{name}", **ITERS, **{
                "tracking.uri": server.uri, "tracking.experiment": "outages",
                "runtime.output_dir": str(self.output_dir(name)),
                "data.train.ann_file": str(data / "annotations" / "instances_train.json"),
                "data.train.img_dir": str(data / "train")})
            done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(path), "--backend", "local"],
                                  env=env, cwd=self.folder, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            self.jobs[name] = done.stdout.split("submitted ", 1)[1].split()[0]
        for drive in (self._one_minute, self._until_after_the_end):
            self.threads.append(threading.Thread(target=self._guarded, args=(drive,), daemon=True))
            self.threads[-1].start()

    def _held_data(self, name: str, shapes_data: Path) -> Path:
        """The job's own copy of the data, one training image of it a :class:`HeldImage` that
        holds the first read after the job's first journaled steps (its step 10, a checkpoint's
        flush; the image is read once per 8-step epoch)."""
        data, image = fifo_dataset(shapes_data, self._made(self.folder / f"data-{name}"))
        journal = self.journal(name)
        self.images[name] = HeldImage(data / "train" / image, (shapes_data / "train" / image).read_bytes(),
                                      lambda: last_steps(journal).get("loss", 0) > 0)
        return data

    def _guarded(self, drive: Callable[[], None]) -> None:
        try:
            drive()
        except BaseException as err:  # noqa: BLE001 - re-raised by join()
            self.errors.append(err)

    def _record(self, name: str) -> dict:
        return read_json(self.home / "jobs" / self.jobs[name] / "record.json") or {}

    def _stop_mid_run(self, name: str) -> None:
        """Stop the job's server mid-run, once some of its metric values arrived. Training waits
        in a read of its held image (:class:`HeldImage`) from its first journaled steps until the
        server is down, so that "mid-run" holds however loaded the machine is; the shipper, a
        process of its own, goes on."""
        server, journal, image = self.servers[name], self.journal(name), self.images[name]
        try:
            wait_for(image.held.is_set, 300, f"job {name}'s training to wait in its held read")
            wait_for(lambda: shipped_steps(journal, server.uri) > 0, 60, f"job {name}'s first values at the server")
            self.notes[name].update(running_at_stop=last_status(journal) not in TERMINAL, stopping=time.time(),
                                    steps_at_stop=last_steps(journal).get("loss", 0))
            server.stop(hold_port=True)
            self.notes[name]["stopped"] = time.time()
        finally:
            image.release()

    def _one_minute(self) -> None:
        self._stop_mid_run("a")
        if self.closing.wait(OUTAGE_S):
            return
        self.servers["a"].start()
        self.notes["a"]["restarted"] = time.time()
        self._delivered("a")

    def _until_after_the_end(self) -> None:
        self._stop_mid_run("b")
        wait_for(lambda: self._record("b").get("ended_at"), 600, "job b to end", poll_s=1.0)
        ended = self._record("b")["ended_at"]
        self.notes["b"].update(ended=ended, down_at_end=not reachable(self.servers["b"].uri),
                               result_written=os.path.getmtime(self.output_dir("b") / "result.json"))
        if self.closing.wait(max(0.0, ended + AFTER_END_S - time.time())):
            return
        self.notes["b"]["down_until"] = time.time()
        self.servers["b"].start()
        self.notes["b"]["restarted"] = time.time()
        self._delivered("b")

    def _delivered(self, name: str) -> None:
        """Note when the run's final status (the journal's last line) reached the server."""
        journal, uri = self.journal(name), self.servers[name].uri
        wait_for(lambda: load_cursor(journal, uri).status in TERMINAL, 400, f"job {name}'s run at the server")
        self.notes[name]["delivered"] = time.time()

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), "the outage scenarios did not finish in time"
        if self.errors:
            raise self.errors[0]

    def stop(self) -> None:
        self.closing.set()
        for image in self.images.values():
            image.release()
        for thread in self.threads:
            thread.join(10)
        for server in self.servers.values():
            server.stop()

    def check(self) -> None:
        """(a) The server stopped mid-run and was back 60 s later: the job SUCCEEDED and its run
        got every value and FINISHED. (b) It stopped mid-run and was back only 5 minutes after
        the job ended: the job SUCCEEDED and wrote result.json while the server was down; the
        shipper lingered and delivered every value and FINISHED once it was back."""
        a, b = self.notes["a"], self.notes["b"]
        assert a["running_at_stop"] and b["running_at_stop"], (a, b)  # the stops landed mid-run
        assert 0 < a["steps_at_stop"] < 60 and 0 < b["steps_at_stop"] < 60, (a, b)
        assert a["restarted"] - a["stopped"] >= OUTAGE_S
        assert b["down_at_end"] and b["stopping"] < b["result_written"] < b["down_until"]  # written while down
        assert b["down_until"] - b["ended"] >= AFTER_END_S and b["ended"] < b["restarted"]
        # Its shipper probes the closed port every few seconds instead of waiting in MLflow's HTTP
        # retries (2 min between tries at the end): the run arrives soon after the server is back.
        assert b["delivered"] - b["restarted"] < 60
        print(f"servers stopped at step a {a['steps_at_stop']}, b {b['steps_at_stop']} of 60; delivered after the "
              f"restart: a {a['delivered'] - a['restarted']:.0f} s, b {b['delivered'] - b['restarted']:.0f} s")
        for name, server in self.servers.items():
            record = wait_job(self.jobs[name], JobState.SUCCEEDED, timeout_s=60)
            assert record.exit_code == 0 and json.loads((self.output_dir(name) / "result.json").read_text())["metrics"]
            journal = self.journal(name)
            run_id = wait_shipped(journal, server.uri, 60)
            assert load_cursor(journal, server.uri).status == "FINISHED", f"job {name}'s run was not delivered"
            found = values_of(server.uri, run_id)
            assert found["run"].info.status == "FINISHED"
            assert found["metrics"] == journal_history(journal), name  # step for step, value for value
            assert [step for step, _, _ in found["metrics"]["loss"]] == list(range(1, 61))


@pytest.fixture
def outages(tmp_path, make_experiment, shapes_data, reap_shippers):
    """The two outages, started; servers stopped and shippers reaped at the end."""
    scenario = Outages(tmp_path / "outages")
    try:
        scenario.start(make_experiment, shapes_data)
        yield scenario
    finally:
        scenario.stop()
        reap_shippers(scenario.folder)


def offline_job_synced_later_equals_an_online_run(make_experiment, uri: str, folder: Path, capsys) -> None:
    """(c) Compute nodes that never reach the server: ``tracking.mode: offline`` (the job's URI is
    a closed port) succeeds without shipping anything; ``orch sync JOB --uri`` from a machine that
    reaches the server then gives the run an online job of the same seed got, value for value;
    syncing 5 times adds nothing."""
    from mlflow.tracking import MlflowClient

    common = {**ITERS, "tracking.experiment": "offline-vs-online"}
    offline = make_experiment(_name="offline.yaml", name="offline", **common, **{
        "runtime.output_dir": str(folder / "offline"), "tracking.mode": "offline",
        "tracking.uri": f"http://127.0.0.1:{_free_port()}"})
    online = make_experiment(_name="online.yaml", name="online", **common, **{
        "runtime.output_dir": str(folder / "online"), "tracking.mode": "online", "tracking.uri": uri})
    jobs = {"offline": submit(offline), "online": submit(online)}
    records = {name: wait_job(job_id, JobState.SUCCEEDED) for name, job_id in jobs.items()}
    journals = {name: journal_dir(r.output_dir) for name, r in records.items()}

    assert not os.path.exists(os.path.join(journals["offline"], "cursors"))  # nothing shipped, no shipper
    assert not os.path.exists(os.path.join(journals["offline"], "shipper.json"))
    online_run = wait_shipped(journals["online"], uri, 300)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("offline-vs-online").experiment_id
    assert [r.info.run_name for r in client.search_runs([experiment])] == ["online"]

    capsys.readouterr()
    outputs = []
    for _ in range(5):
        assert cli(["sync", jobs["offline"], "--uri", uri]) == 0
        outputs.append(capsys.readouterr().out.splitlines()[0])
    assert "1 run(s) created" in outputs[0] and ", 0 pending, 0 failed" in outputs[0]
    assert all("0 run(s) created, 0 value(s) sent" in line for line in outputs[1:]), outputs
    offline_run = load_cursor(journals["offline"], uri).run_id

    found = {name: values_of(uri, run_id) for name, run_id in (("offline", offline_run), ("online", online_run))}
    assert found["offline"]["metrics"] == journal_history(journals["offline"])  # every value, once
    assert found["offline"]["run"].info.status == found["online"]["run"].info.status == "FINISHED"
    history = {name: {k: [(step, value) for step, _, value in rows] for k, rows in f["metrics"].items()}
               for name, f in found.items()}
    assert sorted(history["offline"]) == sorted(history["online"])
    for key, rows in history["online"].items():
        if key.startswith("system/"):  # CPU and memory samples every N seconds: when, not what, is seeded
            continue
        assert [s for s, _ in history["offline"][key]] == [s for s, _ in rows], key
        if key != "images_per_s":  # a timing: the only value that is not a function of the seed
            assert history["offline"][key] == rows, key  # same seed, deterministic CPU training
    assert len(history["online"]["loss"]) == 60
    params = {name: f["params"] for name, f in found.items()}
    differ = {k for k in params["online"] if params["online"][k] != params["offline"].get(k)}
    assert differ == {"name", "runtime.output_dir", "tracking.mode", "tracking.uri"}


def training_killed_9_resumes_in_the_same_run(make_experiment, uri: str, folder: Path) -> None:
    """(d) kill -9 of the training process after its journal got steps past the last checkpoint:
    the job is FAILED; resubmitted with ``runtime.resume=auto`` it continues from the checkpoint
    in the same journal and MLflow run; after ``orch sync``: one run, FINISHED, each step once."""
    output = folder / "killed"
    settings = {**ITERS, "schedule.iterations": 100, "checkpoint.interval": 40, "eval.interval": 100,
                "tracking.uri": uri, "tracking.experiment": "killed-and-resumed", "runtime.output_dir": str(output)}
    path = make_experiment(_name="killed.yaml", name="killed", **settings)
    first = submit(path)
    journal = journal_dir(str(output))
    pointer = output / "checkpoints" / "last_checkpoint"

    def past_the_checkpoint() -> bool:  # values after the newest checkpoint are on disk (flushed)
        return (pointer.exists() and pointer.read_text().strip() == "iter_40.pth"
                and last_steps(journal).get("loss", 0) > 40)

    wait_for(past_the_checkpoint, 600, "journaled steps past the checkpoint of step 40", poll_s=0.05)
    record = load_record(first)
    assert record.state == JobState.RUNNING
    os.kill(record.extra["pids"][0], signal.SIGKILL)
    failed = wait_job(first, JobState.FAILED)
    # orch ends the run in the journal as it records the job's end (training could not)
    wait_for(lambda: last_status(journal) == "FAILED", 60, "the killed job's run to end FAILED")
    assert 40 < last_steps(journal)["loss"] < 100
    run_id = wait_shipped(journal, uri, 300)
    assert values_of(uri, run_id)["run"].info.status == "FAILED"

    second = submit(path, "runtime.resume=auto")
    resumed = wait_job(second, JobState.SUCCEEDED)
    assert resumed.output_dir == failed.output_dir
    log = Path(resumed.log_path).read_text()
    assert "resumed from" in log and "iter_40.pth" in log
    assert cli(["sync", second]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("killed-and-resumed").experiment_id
    [run] = client.search_runs([experiment])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    found = values_of(uri, run_id)
    for key in ("loss", "lr", "images_per_s"):
        assert [step for step, _, _ in found["metrics"][key]] == list(range(1, 101)), key  # each step once
    assert found["metrics"] == journal_history(journal)


def cancelled_and_failed_jobs_end_their_runs(make_experiment, uri: str, folder: Path) -> None:
    """(e) A job cancelled mid-run ends KILLED on the server, one failing before training FAILED
    (with the error as a tag): never left RUNNING."""
    common = {"tracking.uri": uri, "tracking.experiment": "cancelled-and-failed"}
    long = make_experiment(_name="long.yaml", name="cancelled", **common, **{
        "schedule.iterations": 100000, "runtime.output_dir": str(folder / "cancelled")})
    broken = make_experiment(_name="broken.yaml", name="broken", **common, **{
        "data.train.ann_file": str(folder / "missing.json"), "runtime.output_dir": str(folder / "broken")})
    cancelled, failed = submit(long), submit(broken, check_data=False)  # its data "only on the compute nodes"
    journal = journal_dir(str(folder / "cancelled"))
    wait_for(lambda: shipped_steps(journal, uri) > 0, 600, "the cancelled job's first values")
    assert cli(["cancel", cancelled]) == 0
    records = {"KILLED": wait_job(cancelled, JobState.CANCELLED), "FAILED": wait_job(failed, JobState.FAILED)}
    found = {}
    for status, record in records.items():
        run_id = wait_shipped(journal_dir(record.output_dir), uri, 300)
        found[status] = values_of(uri, run_id)
        assert found[status]["run"].info.status == status, record.name
    assert "missing.json" in found["FAILED"]["tags"]["orch.error"]
    assert found["KILLED"]["metrics"]["loss"]  # it had trained: its values are there too


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~6-7 min, nearly all of it waiting for (b)'s server to come back
def test_jobs_through_server_outages(outages, make_experiment, local_orch_env, mlflow_server, tmp_path, capsys,
                                     monkeypatch, reap_shippers):
    """(a) and (b) run in the background from the start (``outages``); (c), (d), (e) run here
    meanwhile, each with a job folder of its own, against the module's server, which stays up."""
    try:
        offline_job_synced_later_equals_an_online_run(make_experiment, mlflow_server.uri, tmp_path / "work", capsys)
        training_killed_9_resumes_in_the_same_run(make_experiment, mlflow_server.uri, tmp_path / "work")
        cancelled_and_failed_jobs_end_their_runs(make_experiment, mlflow_server.uri, tmp_path / "work")
        outages.join(timeout_s=900)
        monkeypatch.setenv("ORCH_HOME", str(outages.home))
        outages.check()
    finally:
        reap_shippers(tmp_path / "work")
