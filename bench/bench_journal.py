"""What journal-first tracking costs: the training thread's per-step cost, and the shipper's CPU.

1. Training thread: ``Journal.log_metrics`` of ``--keys`` values every step and ``flush()``
   every ``--flush-every`` steps (what rank 0's MLflow hook does), microseconds per step,
   median over ``--repeats`` runs of ``--steps`` steps; also the cost of one flush and of a
   durable flush (fsync, at checkpoints).
2. Shipper: CPU seconds of the shipping process per 1000 values (metric values of the same
   shape) into a fresh SQLite file and into a real ``mlflow server`` on 127.0.0.1 (started
   here, port chosen at run time). Client start-up, experiment and run creation are excluded
   (a small journal is shipped first); the server's own CPU is reported beside it.
3. ``--sqlite-writers N``: N processes ``log_batch`` 20 x 100 values each into one SQLite file
   at once, with the file in rollback-journal mode (SQLite's default) and in WAL mode (what the
   shipper sets): how many calls fail with "database is locked" despite MLflow's 20 s busy timeout.

    .venv/bin/python bench/bench_journal.py --steps 20000 --repeats 5 --ship-values 20000
    .venv/bin/python bench/bench_journal.py --ship-values 0 --sqlite-writers 24
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "orchestrator" / "tracking")]

from detection.journal import Journal  # noqa: E402


def training_thread(steps: int, keys: int, flush_every: int, repeats: int) -> dict[str, float]:
    """Per-step and per-flush costs on the calling thread, in microseconds."""
    names = [f"loss_{i}" for i in range(keys)]
    per_step, per_flush, durable = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            journal = Journal.create(Path(tmp) / f"r{repeat}", "bench", "run")
            values = dict.fromkeys(names, 0.5)
            flush_s = 0.0
            start = time.perf_counter()
            for step in range(steps):
                values["loss_0"] = 1.0 / (step + 1)
                journal.log_metrics(values, step)
                if step % flush_every == flush_every - 1:
                    t0 = time.perf_counter()
                    journal.flush()
                    flush_s += time.perf_counter() - t0
            per_step.append((time.perf_counter() - start) / steps * 1e6)
            per_flush.append(flush_s / (steps // flush_every) * 1e6)
            t0 = time.perf_counter()
            journal.log_metrics(values, steps)
            journal.flush(durable=True)
            durable.append((time.perf_counter() - t0) * 1e6)
            journal.close()
    return {"us_per_step": statistics.median(per_step), "us_per_step_min": min(per_step),
            "us_per_flush": statistics.median(per_flush), "us_durable_flush": statistics.median(durable)}


def _journal(folder: Path, values: int, keys: int) -> str:
    journal = Journal.create(folder, "bench-ship", folder.parent.name)
    journal.set_status("RUNNING")
    for step in range(values // keys):
        journal.log_metrics({f"loss_{i}": step + i / 10 for i in range(keys)}, step)
        if step % 50 == 49:
            journal.flush()
    journal.set_status("FINISHED")
    journal.close()
    return journal.folder


def shipper_cpu(uri: str, values: int, keys: int, tmp: Path, server_pid: int | None = None) -> dict[str, float]:
    """CPU seconds per 1000 values of ``ship`` (this process) and of the server process."""
    from orchestrator.tracking.shipper import ship

    ship(_journal(tmp / "warm" / "journal", keys * 2, keys), uri)  # client, experiment, first run
    folder = _journal(tmp / "big" / "journal", values, keys)
    server = _cpu_of(server_pid)
    wall, cpu = time.perf_counter(), time.process_time()
    result = ship(folder, uri)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert result.done and result.values == values, result
    out = {"cpu_s_per_1000": cpu / values * 1000, "wall_s_per_1000": wall / values * 1000}
    if server_pid:
        out["server_cpu_s_per_1000"] = (_cpu_of(server_pid) - server) / values * 1000
    return out


def _cpu_of(pid: int | None) -> float:
    """User + system CPU seconds of a process and its children (0 without a pid)."""
    if not pid:
        return 0.0
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def _writer(uri: str, queue) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.store import quiet_store_logs

    quiet_store_logs()
    client, errors = MlflowClient(tracking_uri=uri), 0
    while True:
        try:
            run_id = client.create_run("0").info.run_id
            break
        except Exception:  # noqa: BLE001 - counted
            errors += 1
    for batch in range(20):
        metrics = [Metric(f"k{j % 10}", float(j), batch * 100 + j, batch * 100 + j) for j in range(100)]
        while True:
            try:
                client.log_batch(run_id, metrics=metrics)
                break
            except Exception:  # noqa: BLE001 - counted, then tried again
                errors += 1
                time.sleep(0.5)
    queue.put(errors)


def sqlite_writers(count: int, wal: bool, tmp: Path) -> tuple[int, float]:
    """("database is locked" failures, wall seconds) of ``count`` concurrent writer processes."""
    import multiprocessing
    import sqlite3

    from mlflow.tracking import MlflowClient

    path = tmp / ("wal.db" if wal else "rollback.db")
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # tables first
    if wal:
        sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").fetchone()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(f"sqlite:///{path}", queue)) for _ in range(count)]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    failures = sum(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
    return failures, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=10, help="metric values per step")
    parser.add_argument("--flush-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ship-values", type=int, default=20000, help="values shipped per destination (0: skip)")
    parser.add_argument("--sqlite-writers", type=int, default=0, help="concurrent SQLite writers to compare (0: skip)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    t = training_thread(args.steps, args.keys, args.flush_every, args.repeats)
    print(f"training thread: {args.keys} values/step, flush every {args.flush_every} steps: "
          f"{t['us_per_step']:.2f} us/step median (min {t['us_per_step_min']:.2f}); one flush "
          f"{t['us_per_flush']:.0f} us; durable flush {t['us_durable_flush']:.0f} us")
    if args.sqlite_writers:
        with tempfile.TemporaryDirectory() as tmp:
            for wal in (False, True):
                failures, wall = sqlite_writers(args.sqlite_writers, wal, Path(tmp))
                print(f"{args.sqlite_writers} SQLite writers, {'WAL' if wal else 'rollback journal'}: "
                      f"{failures} failed calls (database is locked), {wall:.0f} s")
    if not args.ship_values:
        return
    from ship_helpers import MlflowServer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "sqlite").mkdir()
        s = shipper_cpu(f"sqlite:///{tmp / 'sqlite' / 'mlflow.db'}", args.ship_values, args.keys, tmp / "sqlite")
        print(f"shipper -> SQLite: {s['cpu_s_per_1000']:.3f} CPU s per 1000 values "
              f"({s['wall_s_per_1000']:.3f} s wall)")
        (tmp / "server").mkdir()
        server = MlflowServer(tmp / "server")
        server.start()
        try:
            s = shipper_cpu(server.uri, args.ship_values, args.keys, tmp / "server", server.proc.pid)
        finally:
            server.stop()
        print(f"shipper -> mlflow server: {s['cpu_s_per_1000']:.3f} CPU s per 1000 values "
              f"({s['wall_s_per_1000']:.3f} s wall; server {s['server_cpu_s_per_1000']:.3f} CPU s)")


if __name__ == "__main__":
    main()
