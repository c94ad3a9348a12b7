"""Fixtures of the shipper tests (helpers in ``ship_helpers``).

    mlflow_server      (module) a running ``mlflow server`` shared by a test module
    own_server         a server of one test's own (the test may stop and restart it)
    sqlite_uri         a fresh SQLite store (a copy of an empty one: creating tables costs 10-20 s)
    destination        parametrised: ``sqlite_uri``, then the module's server
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ship_helpers import MlflowServer


def _server(folder: Path):
    server = MlflowServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A running server shared by the tests of one module (they use distinct experiments)."""
    yield from _server(tmp_path_factory.mktemp("mlflow_server"))


@pytest.fixture
def own_server(tmp_path):
    """A server for one test, which may ``stop()`` and ``start()`` it (same port)."""
    folder = tmp_path / "server"
    folder.mkdir()
    yield from _server(folder)


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite file with its tables created (creating them costs 10-20 s here)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(tmp_path, _empty_store) -> str:
    """A fresh SQLite store for one test (a copy of an empty one)."""
    import shutil

    shutil.copy(_empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(params=["sqlite", "server"])
def destination(request) -> str:
    """Each test with it runs twice: into a fresh SQLite file and into the module's server."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_uri")
    return request.getfixturevalue("mlflow_server").uri
