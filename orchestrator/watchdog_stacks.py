"""Every rank's stack when a job hangs, and one line saying where the ranks are.

:func:`dump_stacks` asks py-spy for a live process's threads and those of its children (the data
loader's workers), native frames included where py-spy can read them; where py-spy cannot run
(missing, not permitted) it sends ``STACK_SIGNAL`` to the rank, whose heartbeat hook registered
``faulthandler`` on it (Python frames only, written to a file beside the heartbeat).
:func:`where` reduces a rank's threads to a :class:`Where` ("blocked in read", "waiting in
all_reduce", ...) and :func:`hang_reason` names the ranks that differ from the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

STACK_SIGNAL = signal.SIGUSR1  # detection.hooks.heartbeat registers faulthandler on it
PROJECT_DIRS = ("detection", "orchestrator", "cluster")
# Native or Python calls that mean "waiting for the file system or the network".
IO_CALLS = re.compile(r"^(__)?(open|open64|openat|openat64|read|pread|pread64|readv|"
                      r"read_file|readinto|stat|stat64|fstat|lstat|statx|getdents64|fsync|write|pwrite64)"
                      r"(_nocancel)?$")
COLLECTIVES = re.compile(r"(all_reduce|allreduce|broadcast|barrier|all_gather|allgather|reduce_scatter|"
                         r"all_to_all|alltoall|monitored_barrier|recv|send|gather|scatter)", re.I)
IMAGE = re.compile(r"[^\"'/\\]+\.(jpe?g|png|bmp|tiff?|webp|gif)\b", re.I)


@dataclass(frozen=True)
class Frame:
    """One frame: function ``name``, ``file`` (full path, or the library for native frames),
    ``line`` (0 for native) and the reprs of its locals."""

    name: str
    file: str
    line: int
    native: bool
    locals: tuple[tuple[str, str], ...] = ()

    @property
    def short(self) -> str:
        """``detection/data/decode.py:26`` for project files, ``image.py:52`` otherwise."""
        return f"{project_path(self.file) or os.path.basename(self.file)}:{self.line}" if self.line else os.path.basename(self.file)


@dataclass(frozen=True)
class Thread:
    """One thread of one process (``pid``), frames innermost first."""

    pid: int
    tid: int
    name: str
    frames: tuple[Frame, ...]


@dataclass(frozen=True)
class Where:
    """What a rank does: ``state`` ("blocked in read", "waiting in all_reduce", "in train_step")
    and ``detail`` (the project file:line, the image being read, a loader worker)."""

    state: str
    detail: str = ""

    def text(self) -> str:
        return f"{self.state} ({self.detail})" if self.detail else self.state


def project_path(path: str) -> Optional[str]:
    """``detection/engine.py`` for a file of this project (None for others)."""
    parts = path.replace("\\", "/").split("/")
    for i, part in enumerate(parts[:-1]):
        if part in PROJECT_DIRS and "site-packages" not in parts[:i]:
            return "/".join(parts[i:])
    return None


# -- dumping -------------------------------------------------------------------------------------
def py_spy() -> Optional[str]:
    """The py-spy executable (beside this Python first: a virtual environment's bin)."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.access(beside, os.X_OK) else shutil.which("py-spy")


def dump_stacks(pid: int, timeout_s: float = 60.0) -> tuple[list[Thread], str]:
    """The threads of ``pid`` and of its child processes, with a note of how they were read
    (``py-spy --native``, ``py-spy``, or why it failed). Native frames are tried first and
    dropped when py-spy cannot unwind them on this system."""
    exe = py_spy()
    if exe is None:
        return [], "py-spy not found (pip install py-spy)"
    problem = ""
    for native in (True, False):
        argv = [exe, "dump", "--pid", str(pid), "--json", "--locals", "--subprocesses"] + (["--native"] if native else [])
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            problem = str(err)
            continue
        if out.returncode == 0:
            try:
                return parse_py_spy(json.loads(out.stdout)), "py-spy" + (" --native" if native else "")
            except ValueError as err:
                problem = f"unreadable py-spy output: {err}"
                continue
        problem = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[0]
    return [], f"py-spy failed: {problem}"


def parse_py_spy(data: list[dict[str, Any]]) -> list[Thread]:
    """py-spy's ``dump --json`` output as :class:`Thread` s."""
    threads = []
    for entry in data:
        frames = []
        for f in entry.get("frames") or []:
            native = f.get("locals") is None and f.get("module") not in (None, "")
            local_reprs = tuple((str(v.get("name")), str(v.get("repr"))) for v in (f.get("locals") or []))
            frames.append(Frame(str(f.get("name")), str(f.get("filename") or ""), int(f.get("line") or 0), native,
                                local_reprs))
        threads.append(Thread(int(entry.get("pid") or 0), int(entry.get("os_thread_id") or entry.get("thread_id") or 0),
                              str(entry.get("thread_name") or ""), tuple(frames)))
    return threads


def faulthandler_stacks(pid: int, path: str, wait_s: float = 3.0) -> str:
    """The fallback: signal the rank's faulthandler and read what it wrote to ``path`` (Python
    frames of every thread; '' when nothing came)."""
    start = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        os.kill(pid, STACK_SIGNAL)
    except OSError:
        return ""
    deadline = time.monotonic() + wait_s
    text = ""
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                handle.seek(start)
                text = handle.read()
        except OSError:
            continue
        if text.strip():
            time.sleep(0.3)  # let it finish writing every thread
            with open(path, encoding="utf-8", errors="replace") as handle:
                handle.seek(start)
                return handle.read()
    return text


FAULTHANDLER_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def parse_faulthandler(text: str, pid: int) -> list[Thread]:
    """faulthandler's dump (``Thread 0x... (most recent call first):`` blocks) as threads."""
    threads, frames, name = [], [], ""
    for line in text.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            if frames:
                threads.append(Thread(pid, 0, name, tuple(frames)))
            frames, name = [], line.strip()
        match = FAULTHANDLER_FRAME.search(line)
        if match:
            frames.append(Frame(match.group(3), match.group(1), int(match.group(2)), False))
    if frames:
        threads.append(Thread(pid, 0, name, tuple(frames)))
    # faulthandler lists the thread that received the signal (the main thread) first as "Current".
    return threads


def render(threads: list[Thread]) -> str:
    """The threads as text, py-spy's layout, with the locals of project frames."""
    lines = []
    for thread in threads:
        lines.append(f"Process {thread.pid} thread {thread.tid} {thread.name!r}:")
        for frame in thread.frames:
            name = frame.name if len(frame.name) < 160 else frame.name[:157] + "..."  # C++ templates
            lines.append(f"    {name} ({frame.short if not frame.native else os.path.basename(frame.file)})")
            if project_path(frame.file):
                lines.extend(f"        {name} = {value[:200]}" for name, value in frame.locals)
        lines.append("")
    return "\n".join(lines)


# -- reading ------------------------------------------------------------------------------------
def where(threads: list[Thread], pid: int) -> Where:
    """What the rank ``pid`` does, from its main thread (and its loader workers' when the main
    thread waits for them)."""
    own = [t for t in threads if t.pid == pid]
    main = next((t for t in own if t.tid == pid or t.name in ("MainThread",) or t.name.startswith("Current")),
                own[0] if own else None)
    # The thread that trains: Ray Train runs the loop outside the main thread; orch's own threads
    # (the watchdog, the heartbeat ticker) do not count.
    training = [t for t in own if any("detection/" in (project_path(f.file) or "") for f in t.frames)
                and t.name not in ("hang-watchdog", "heartbeat", "system-metrics")]
    if training and (main is None or main not in training):
        main = training[0]
    if main is None:
        return Where("not dumped")
    found = _classify(main)
    if found.state.startswith("waiting for the data loader"):
        for worker in (t for t in threads if t.pid != pid):
            seen = _classify(worker)
            if seen.state.startswith("blocked"):
                detail = f"loader worker pid {worker.pid}" + (f"; {seen.detail}" if seen.detail else "")
                return Where(seen.state, detail)
    return found


def _classify(thread: Thread) -> Where:
    frames = thread.frames
    python = [f for f in frames if not f.native]
    mine = next((f for f in python if project_path(f.file)), None)
    location = mine.short if mine else (python[0].short if python else "")
    image = _image(frames)
    detail = ", ".join(x for x in (location, f"image {image}" if image else "") if x)
    innermost = frames[0] if frames else None
    collective = _in_collective(python)
    # A blocking file-system call near the top of the stack (native, or a Python reader), or,
    # without native frames, the call on the innermost Python frame's line.
    io = next((f for f in frames[:3] if IO_CALLS.match(f.name.split(".")[-1])), None)
    name = io.name if io is not None else (_source_call(python[0]) if python else None)
    if name is not None and not collective:
        call = "read" if any(k in name for k in ("open", "read", "stat", "getdents")) else name
        what = name if name != call else ""
        return Where(f"blocked in {call}", ", ".join(x for x in (what, detail) if x))
    if collective:
        return Where(f"waiting in {collective}", location)
    if any("dataloader.py" in f.file and f.name.split(".")[-1] in ("_get_data", "_try_get_data")
           for f in python):
        return Where("waiting for the data loader", location)
    name = python[0].name if python else (innermost.name if innermost else "?")
    return Where(f"in {name.split('.')[-1]}", detail)


SOURCE_IO = re.compile(r"\b(open|read|readinto|readline|readlines|read_bytes|read_text|stat|listdir|scandir)\s*\(")


def _source_call(frame: Frame) -> Optional[str]:
    """The file-system call on ``frame``'s source line (``open`` in ``with open(path) as f``),
    when the file is readable here."""
    import linecache

    match = SOURCE_IO.search(linecache.getline(frame.file, frame.line)) if frame.line else None
    return match.group(1) if match else None


def _in_collective(python: list[Frame]) -> Optional[str]:
    """The collective a thread waits in: a torch.distributed call, or DDP's gradient all_reduce
    (which runs under ``backward``)."""
    for frame in python:
        base = frame.name.split(".")[-1]
        path = frame.file.replace("\\", "/")
        if ("torch/distributed" in path or "torch/nn/parallel" in path) and COLLECTIVES.search(base):
            return base.strip("_")
    for frame in python:
        if frame.name.split(".")[-1] in ("_engine_run_backward", "backward") and "torch" in frame.file:
            return "backward (DDP's gradient all_reduce)"
    return None


def _image(frames: tuple[Frame, ...]) -> Optional[str]:
    for frame in frames:
        for _name, value in frame.locals:
            match = IMAGE.search(value)
            if match:
                return match.group(0)
    return None


def hang_reason(wheres: dict[int, Where], hosts: dict[int, str]) -> str:
    """One line naming the ranks that differ from the rest first: ``rank 1 on h2 blocked in read
    (...); ranks 0, 2, 3 waiting in all_reduce (detection/engine.py:208)``."""
    groups: dict[str, list[int]] = defaultdict(list)
    texts: dict[str, Where] = {}
    for rank in sorted(wheres):
        key = wheres[rank].state
        groups[key].append(rank)
        texts.setdefault(key, wheres[rank])
    parts = []
    for key, ranks in sorted(groups.items(), key=lambda item: (len(item[1]), item[1][0])):
        if len(ranks) == 1:
            rank = ranks[0]
            who = f"rank {rank}" + (f" on {hosts[rank]}" if hosts.get(rank) else "")
            parts.append(f"{who} {wheres[rank].text()}")
        else:
            names = ", ".join(map(str, ranks))
            on = {hosts.get(r) for r in ranks} - {None, ""}
            where_text = f" on {on.pop()}" if len(on) == 1 and len({hosts.get(r) for r in hosts}) > 1 else ""
            parts.append(f"ranks {names}{where_text} {texts[key].text()}")
    return "; ".join(parts)
