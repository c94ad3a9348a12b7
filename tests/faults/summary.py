"""The fault suite's results as the tables of RELIABILITY.md (standard library only).

    python tests/faults/summary.py [RESULTS.json ...]   # several: one table over all their outcomes

RESULTS.json is what a run of the suite wrote (``$ORCH_FAULTS_RESULTS``; ``make faults`` writes
``work_dirs/faults/results.json``, the default here). Run it as a file: a package named ``tests``
in site-packages shadows this folder for ``python -m``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT = Path("work_dirs/faults/results.json")
BACKENDS = ("local", "torchrun", "slurm", "ray")


def table(rows: list[list[str]]) -> str:
    """A Markdown table; the first row is the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def per_backend(outcomes: list[dict]) -> str:
    rows = [["backend", "faults injected", "jobs finished", "failed by design, one-line reason", "work lost (max steps)",
             "MLflow runs left RUNNING", "orphan processes", "leaked leases", "shared device/port", "broken invariants"]]
    by = defaultdict(list)
    for o in outcomes:
        by[o["scenario"]["backend"]].append(o)
    for backend in [b for b in BACKENDS if b in by] + sorted(set(by) - set(BACKENDS)):
        group = by[backend]
        rows.append([
            backend, len(group), f"{sum(o['finished'] for o in group)}/{len(group)}",
            sum(o["first_state"] == "FAILED" and o["scenario"]["fatal"] for o in group),
            max((o["lost_steps"] for o in group), default=0),
            sum(o["running_runs"] for o in group), sum(len(o["orphans"]) for o in group),
            sum(len(o["leaked_leases"]) for o in group), sum(len(o["shared"]) for o in group),
            sum(len(o["problems"]) for o in group),
        ])
    return table(rows)


def per_fault(outcomes: list[dict]) -> str:
    rows = [["fault", "backend", "runs", "landed", "first run", "lost steps (max)", "reason when it failed (one line)"]]
    by = defaultdict(list)
    for o in outcomes:
        by[(o["scenario"]["fault"], o["scenario"]["backend"])].append(o)
    for (fault, backend), group in sorted(by.items()):
        landed = ", ".join(sorted({o["landed"] for o in group if o["landed"]}))
        states = ", ".join(f"{s} x{n}" for s, n in sorted(_count(o["first_state"] for o in group).items()))
        reason = next((o["error"] for o in group if o["first_state"] == "FAILED" and o["error"]), "")
        rows.append([fault, backend, len(group), landed, states, max(o["lost_steps"] for o in group),
                     (reason[:140] + "...") if len(reason) > 140 else reason])
    return table(rows)


def _count(values) -> dict:
    out: dict = defaultdict(int)
    for value in values:
        out[value] += 1
    return out


def render(data: dict) -> str:
    outcomes = data["outcomes"]
    seeds = data.get("seeds") or []
    contiguous = seeds == list(range(min(seeds, default=0), max(seeds, default=-1) + 1))
    listed = f"{min(seeds)}..{max(seeds)}" if contiguous and seeds else ",".join(map(str, seeds))
    head = (f"{len(outcomes)} scenario(s), seeds {listed}, "
            f"{data.get('seconds', 0):.0f} s on {data.get('cores')} cores ({data.get('started', '?')}); "
            f"command: {data.get('command', '?')}")
    problems = [f"- seed {o['scenario']['seed']} {o['scenario']['name']}: {p}" for o in outcomes for p in o["problems"]]
    parts = [head, "", per_backend(outcomes), "", per_fault(outcomes)]
    parts += ["", "Broken invariants:", *(problems or ["- none"])]
    return "\n".join(parts) + "\n"


def merged(datas: list[dict]) -> dict:
    """Several runs as one (every outcome kept: a seed run twice counts twice)."""
    if len(datas) == 1:
        return datas[0]
    return {"outcomes": [o for d in datas for o in d["outcomes"]], "seeds": [s for d in datas for s in d.get("seeds", [])],
            "seconds": sum(d.get("seconds", 0) for d in datas), "cores": datas[0].get("cores"),
            "started": datas[0].get("started"), "command": f"{len(datas)} runs"}


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [DEFAULT]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"summary: {missing[0]} does not exist; run `make faults` (or give the results file)", file=sys.stderr)
        return 2
    print(render(merged([json.loads(p.read_text()) for p in paths])), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
