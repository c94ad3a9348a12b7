"""``cluster.imports.heavy_imports``: the collector paused inside, restored after, what exists frozen."""

from __future__ import annotations

import gc
import sys

import pytest

from cluster.imports import heavy_imports


@pytest.fixture(autouse=True)
def restore_gc():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_the_collector_is_paused_inside_and_on_again_after(tmp_path, monkeypatch):
    (tmp_path / "orch_fresh_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gc.enable()
    with heavy_imports():
        assert not gc.isenabled()
        import orch_fresh_module  # noqa: F401
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0  # what the block imported is out of later full collections
    monkeypatch.delitem(sys.modules, "orch_fresh_module")


def test_a_block_that_imports_nothing_new_freezes_nothing():
    gc.unfreeze()
    with heavy_imports():
        import os  # noqa: F401 - imported long ago
    assert gc.get_freeze_count() == 0


def test_a_paused_collector_stays_paused_and_an_error_still_restores():
    gc.disable()
    with heavy_imports():
        pass
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(ImportError):
        with heavy_imports():
            import no_such_module_here  # noqa: F401
    assert gc.isenabled()
