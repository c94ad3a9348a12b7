"""Expand Slurm hostlist expressions (``gpu[01-03,07],cpu5``) in Python, without ``scontrol``.

Grammar (what Slurm writes into ``SLURM_JOB_NODELIST``):

    hostlist := host ("," host)*
    host     := (text | "[" ranges "]")+          several bracket groups multiply out
    ranges   := range ("," range)*
    range    := digits | digits "-" digits         zero padding of the low bound is kept

``expand_hostlist("a[1-2]-b[3-4]")`` -> ``["a1-b3", "a1-b4", "a2-b3", "a2-b4"]`` (Slurm's order:
the last group varies fastest).
"""

from __future__ import annotations

import itertools
import re

from cluster.errors import ClusterError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# A cap so that a typo such as node[1-99999999] fails instead of filling memory.
MAX_HOSTS = 1_000_000


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist expression into host names, in order, duplicates kept.

    Raises :class:`ClusterError` naming the expression when it is malformed (unbalanced or
    nested brackets, empty items, a range whose high bound is below its low bound).
    """
    if expr is None or not expr.strip():
        raise ClusterError("empty hostlist expression; expected e.g. 'gpu[01-03,07],cpu5'")
    expr = expr.strip()
    hosts: list[str] = []
    for item in _split_top_level(expr):
        if not item:
            raise ClusterError(f"hostlist {expr!r} has an empty host name (stray comma)")
        hosts.extend(_expand_host(item, expr))
        if len(hosts) > MAX_HOSTS:
            raise ClusterError(f"hostlist {expr!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def _split_top_level(expr: str) -> list[str]:
    """Split on commas outside brackets, checking that brackets balance and do not nest."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(expr):
        if char == "[":
            if depth:
                raise ClusterError(f"hostlist {expr!r}: nested '[' at position {i}")
            depth = 1
        elif char == "]":
            if not depth:
                raise ClusterError(f"hostlist {expr!r}: ']' without '[' at position {i}")
            depth = 0
        elif char == "," and not depth:
            items.append(expr[start:i].strip())
            start = i + 1
    if depth:
        raise ClusterError(f"hostlist {expr!r}: '[' is never closed")
    items.append(expr[start:].strip())
    return items


def _expand_host(item: str, expr: str) -> list[str]:
    """Expand one host pattern with zero or more bracket groups (cartesian product)."""
    parts: list[list[str]] = []
    for piece in re.split(r"(\[[^\]]*\])", item):
        if piece.startswith("["):
            parts.append(_expand_ranges(piece[1:-1], expr))
        elif piece:
            if any(c.isspace() for c in piece):
                raise ClusterError(f"hostlist {expr!r}: host name {piece!r} contains whitespace")
            parts.append([piece])
    return ["".join(combo) for combo in itertools.product(*parts)]


def _expand_ranges(body: str, expr: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``."""
    out: list[str] = []
    for rng in body.split(","):
        match = _RANGE.match(rng.strip())
        if not match:
            raise ClusterError(
                f"hostlist {expr!r}: bad range {rng!r} in [{body}]; expected N or N-M with digits"
            )
        low_text, high_text = match.group(1), match.group(2)
        low = int(low_text)
        high = int(high_text) if high_text is not None else low
        if high < low:
            raise ClusterError(f"hostlist {expr!r}: range {rng!r} goes down ({low} > {high})")
        if high - low >= MAX_HOSTS:
            raise ClusterError(f"hostlist {expr!r}: range {rng!r} is too large")
        # Slurm keeps the width of the low bound: [08-10] -> 08 09 10, [8-10] -> 8 9 10.
        width = len(low_text)
        out.extend(str(n).zfill(width) for n in range(low, high + 1))
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's ``SLURM_TASKS_PER_NODE`` form ``2(x3),1`` into ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ClusterError(
                f"SLURM_TASKS_PER_NODE={spec!r}: cannot read {part!r}; expected e.g. '2(x3),1'"
            )
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
