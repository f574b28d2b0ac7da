"""A driver's backend lifecycle, with overlay2 on a loop-backed ext4 image.

`start()` brings the image up and records the loop device and mount in
<home>/run/resources.json; `down()` takes down exactly those, refuses while a
clone still uses them, and a later start re-attaches so no data is lost. A loop
device that minifs did not make must survive `minifs down`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from minifs import linux
from minifs.errors import InUse, InvalidArgument, MinifsError
from minifs.loopdisk import make_image
from minifs.plugins import get_driver
from minifs.resources import loop_backing_file

SIZE = "512M"


@pytest.fixture(autouse=True)
def overlay2_available() -> None:
    try:
        get_driver("overlay2").probe()
    except MinifsError as exc:
        pytest.skip(f"overlay2: {exc}")


def recorded(home: Path) -> dict[str, dict]:
    """resources.json as {type: record}; overlay2 on a loop makes one of each."""
    records = json.loads((home / "run" / "resources.json").read_text())
    return {r["type"]: r for r in records}


def loop_storage(open_storage):
    storage = open_storage("overlay2", backing="loop", size=SIZE)
    storage.clone("base")  # the first change brings the backend up
    return storage


def test_start_records_loop_and_mount(open_storage):
    storage = loop_storage(open_storage)
    home = storage.driver.home
    res = recorded(home)
    assert set(res) == {"loop", "mount"}
    assert res["loop"]["image"] == str((home / "backing.img").resolve())
    assert loop_backing_file(res["loop"]["device"]) == res["loop"]["image"]
    assert res["mount"]["target"] == str(storage.driver.data)
    assert linux.is_mountpoint(storage.driver.data)
    assert storage.store.get("overlay2", "base").id in storage.driver.ids()
    # The clone's directory is on the image, not on the state dir's filesystem.
    assert storage.driver.data == home / "data"
    assert (storage.driver.data / "lost+found").is_dir()


def test_data_survives_down_and_reopen(open_storage, mount):
    storage = loop_storage(open_storage)
    with mount(storage, "base") as path:
        (path / "kept").write_text("across down\n")
    storage.snapshot("base", "v1")
    res = recorded(storage.driver.home)

    stopped = storage.down()
    assert len(stopped) == 2
    assert not linux.is_mountpoint(res["mount"]["target"])
    assert loop_backing_file(res["loop"]["device"]) is None
    assert json.loads((storage.driver.home / "run" / "resources.json").read_text()) == []

    again = open_storage("overlay2")  # options come from the recorded config
    again.clone("work", "v1")
    assert linux.is_mountpoint(again.driver.data)
    with mount(again, "work") as path:
        assert (path / "kept").read_text() == "across down\n"

    # Starting twice re-attaches instead of stacking a second loop and mount.
    third = open_storage("overlay2")
    third.clone("more", "v1")
    assert recorded(third.driver.home) == recorded(again.driver.home)


def test_minifs_down_stops_only_what_minifs_started(open_storage, cli, tmp_path):
    storage = loop_storage(open_storage)
    res = recorded(storage.driver.home)
    unrelated = tmp_path / "unrelated.img"
    make_image(unrelated, 16 << 20, None)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(unrelated)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        done = cli("down", "--json", check=True)
        assert len(json.loads(done.stdout)["overlay2"]) == 2
        assert loop_backing_file(device) == str(unrelated)
        assert loop_backing_file(res["loop"]["device"]) is None
        assert not linux.is_mountpoint(res["mount"]["target"])
        assert json.loads(cli("down", "--json", check=True).stdout) == {"overlay2": []}
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


def test_down_refuses_while_a_clone_is_mounted(open_storage, cli, tmp_path):
    storage = loop_storage(open_storage)
    res = recorded(storage.driver.home)
    target = tmp_path / "mnt"
    target.mkdir()
    storage.mount("base", target)
    try:
        with pytest.raises(InUse, match="minifs umount"):
            storage.down()
        done = cli("down")
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert done.stderr.startswith("minifs: error: ") and "umount" in done.stderr
        # Nothing was half taken down: both records and both resources remain.
        assert recorded(storage.driver.home) == res
        assert linux.is_mountpoint(res["mount"]["target"])
        assert loop_backing_file(res["loop"]["device"]) == res["loop"]["image"]
    finally:
        storage.umount(target)
    assert len(storage.down()) == 2


def test_same_storage_starts_again_after_down(open_storage):
    """After down(), the next change on the same object must bring the backend
    back up rather than write into the bare directory the image was mounted on."""
    storage = loop_storage(open_storage)
    storage.down()
    storage.clone("after")
    assert linux.is_mountpoint(storage.driver.data)
    assert storage.stat("after").id in storage.driver.ids()


def test_down_refuses_while_its_device_is_mounted_elsewhere(open_storage, tmp_path):
    """A clone mounted where the store cannot see it (a container's own mount
    namespace) still holds the loop device: down must not detach it, and the
    next start must re-attach that same device, never a second one."""
    storage = loop_storage(open_storage)
    res = recorded(storage.driver.home)
    diff = storage.driver.diff_dir(storage.stat("base").id)
    target = tmp_path / "elsewhere"
    target.mkdir()
    linux.mount(str(diff), target, None, linux.MS_BIND)
    try:
        with pytest.raises(InUse):
            storage.down()
        assert loop_backing_file(res["loop"]["device"]) == res["loop"]["image"]
        again = open_storage("overlay2")
        again.clone("more")
        assert recorded(again.driver.home)["loop"]["device"] == res["loop"]["device"]
        assert linux.is_mountpoint(again.driver.data)
    finally:
        linux.umount(target)
    assert storage.down()


@pytest.mark.parametrize("conflict", [{"backing": "direct"}, {"size": "1G"}])
def test_options_conflicting_with_recorded_backing(open_storage, cli, conflict):
    storage = loop_storage(open_storage)
    rows = storage.list()
    other = open_storage("overlay2", **conflict)
    key, value = next(iter(conflict.items()))
    with pytest.raises(InvalidArgument, match=f"{key}="):
        other.clone("x")
    done = cli("--storage-opt", f"overlay2.{key}={value}", "clone", "x")
    assert done.returncode == 2 and done.stderr.startswith("minifs: error: ")
    assert storage.list() == rows
    # Agreeing (or automatic) options are fine.
    open_storage("overlay2", backing="auto", size=SIZE).clone("y")


def test_auto_backing_uses_a_loop_image_where_overlay_cannot_be_upper(tmp_path: Path):
    """A state dir on overlayfs (minifs itself inside a container) cannot hold
    overlay upper dirs; `backing=auto` must notice and move to a loop image."""
    from minifs.storage import Storage

    for sub in ("lower", "upper", "work", "merged"):
        (tmp_path / sub).mkdir()
    options = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    linux.mount("overlay", tmp_path / "merged", "overlay", 0, options)
    try:
        storage = Storage("overlay2", tmp_path / "merged" / "state", {"size": SIZE})
        try:
            storage.clone("base")
            assert json.loads(storage.driver.config_path.read_text())["backing"] == "loop"
            assert linux.is_mountpoint(storage.driver.data)
            storage.snapshot("base", "layer")
            storage.clone("work", "layer")  # a real overlay clone on the loop image
            assert {i.name for i in storage.list()} == {"layer", "work"}
            storage.remove("work")
            storage.remove("layer")
        finally:
            storage.down()
            storage.close()
    finally:
        linux.umount(tmp_path / "merged")
