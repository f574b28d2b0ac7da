"""The shortest path through the model on every driver: clone, write, snapshot, clone."""

from __future__ import annotations

import pytest

from tests.conftest import driver_params


@pytest.mark.parametrize("driver", driver_params())
def test_clone_snapshot_clone(driver, open_storage, mount):
    storage = open_storage(driver)
    storage.clone("base")
    with mount(storage, "base") as path:
        (path / "hello").write_text("world")
    storage.snapshot("base", "layer1")
    storage.clone("work", "layer1")
    with mount(storage, "work") as path:
        assert (path / "hello").read_text() == "world"
