"""docs/ARCHITECTURE.md names only what exists: every module, class, function, file and
environment variable it writes in backticks is found in the code, so the first file a developer
reads cannot drift from the code again (it once described an MLflow hook, run-id files and
worker overrides that had been gone for a round).

What a backticked token must match:
- a path (``a/b.py``, ``a/b/``): the file or folder exists in the repository;
- a dotted name rooted in a package (``orchestrator.jobs.refresh_record``): importable, with
  every attribute after the module present;
- ``Class.member``: a class of that name defined in the code has that member in its source;
- an identifier (``transition``, ``JobRecord``, ``ORCH_HOME``, ``runtime.hang_timeout``'s parts):
  defined or used in the code (``def``/``class``/assignment/string), whole word.
Tokens with spaces, operators or placeholders (``<id>``) are prose and skipped.
"""

from __future__ import annotations

import importlib
import re
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
PACKAGES = ("orchestrator", "detection", "cluster")
SOURCE_DIRS = PACKAGES + ("scripts", "bench", "experiments")
# The shared fixtures the document describes; other test files may still name what is gone.
TEST_HELPERS = ("tests/conftest.py", "tests/orch_testing.py")
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


@lru_cache(maxsize=1)
def code_text() -> str:
    parts = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".yaml", ".yml", ".sh") and ".venv" not in path.parts:
                parts.append(path.read_text(errors="replace"))
    parts.extend((REPO / name).read_text() for name in TEST_HELPERS)
    parts.append((REPO / "Makefile").read_text())
    parts.append((REPO / "setup.cfg").read_text())
    return "\n".join(parts)


def tokens() -> list[str]:
    text = DOC.read_text()
    found = []
    for token in re.findall(r"`([^`\n]+)`", text):
        token = token.strip()
        if token.endswith("()"):
            token = token[:-2]
        found.append(token)
    return sorted(set(found))


@lru_cache(maxsize=None)
def repo_has(path: str, folder: bool) -> bool:
    if (REPO / path).exists():
        return True
    for top in PACKAGES + ("scripts", "bench", "tests", "docs"):
        for found in (REPO / top).rglob(Path(path).name):
            if found.as_posix().endswith("/" + path) and found.is_dir() == folder:
                return True
    return False


def _class_source(name: str) -> str | None:
    match = re.search(rf"^class {re.escape(name)}\b.*?(?=^class |\Z)", code_text(), re.M | re.S)
    return match.group(0) if match else None


def problem(token: str) -> str | None:
    """Why ``token`` names nothing in the code, or None when it does (or is prose)."""
    if "://" in token or " " in token or "<" in token or "*" in token:
        return None  # URLs (`env://`), command lines, placeholders: prose
    if "/" in token or re.search(r"\.(py|md|sh)$", token):
        path = token.rstrip("/")
        if path.startswith(("$", "~", "/", "../")) or "{" in path or not re.search(r"\.(py|md|yaml|cfg|sh)$|/$", token):
            return None  # runtime paths (`$ORCH_HOME/jobs/...`): prose
        # relative to the repository, or to a package folder (`slurm/state.py`, `cluster.py`)
        return None if repo_has(path, token.endswith("/")) else f"no file or folder {path}"
    if DOTTED.match(token):
        head = token.split(".")[0]
        if head in PACKAGES:
            parts = token.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attr in parts[cut:]:
                    if not hasattr(obj, attr):
                        return f"{'.'.join(parts[:cut])} has no {attr}"
                    obj = getattr(obj, attr)
                return None
            return f"no module {token}"
        if head[:1].isupper() and _class_source(head) is not None:
            member = token.split(".", 1)[1].split(".")[0]
            source = _class_source(head)
            return None if re.search(rf"\b{re.escape(member)}\b", source) else f"class {head} has no {member}"
        # config keys (`runtime.hang_timeout`), file names (`set.json`): each part must exist
        missing = [part for part in token.split(".") if not re.search(rf"\b{re.escape(part)}\b", code_text())]
        return f"{', '.join(missing)} (of {token}) not in the code" if missing else None
    if IDENT.match(token):
        return None if re.search(rf"\b{re.escape(token)}\b", code_text()) else f"{token} not in the code"
    return None


def test_architecture_doc_names_only_what_exists():
    problems = [f"`{token}`: {why}" for token in tokens() if (why := problem(token))]
    assert not problems, "docs/ARCHITECTURE.md names what the code does not have:\n" + "\n".join(problems)


@pytest.mark.parametrize("token, bad", [
    ("MlflowHook", True), ("transition", False), ("orchestrator/records.py", False),
    ("orchestrator/nowhere.py", True), ("orchestrator.records.transition", False),
    ("orchestrator.records.no_such_function", True), ("ORCH_RUN_ID_FILE_GONE", True),
])
def test_the_check_catches_stale_names(token, bad):
    assert (problem(token) is not None) == bad
