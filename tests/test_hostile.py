"""The hostile corpus: every archive is refused with one line naming the entry,
the clone is left exactly as it was, and nothing outside it changes.

The corpus (tests/corpus) is built at test time. Each case is applied to a
clone that already sits on a layer, so a refusal must also leave the layer
below alone; a host directory the cases aim at (by absolute path, `..`,
symlinks and hard links) is checked before and after.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from minifs.errors import MinifsError
from minifs.layers.snapshots import apply_to
from tests import treeinfo
from tests.conftest import driver_params
from tests.corpus import docker_archive, hostile, member, oci_layout, tar_bytes

CASES = [case.name for case in hostile(Path("/nonexistent"))]
MARKERS = {"escape", "pwned", "abs", "hidden"}


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch\n")
    return outside


def _strays(tmp_path: Path) -> list[str]:
    """Files a case tried to create, anywhere under the test's directory."""
    return [
        os.path.join(top, name)
        for top, dirs, files in os.walk(tmp_path)
        for name in [*dirs, *files]
        if name in MARKERS
    ]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("driver", driver_params())
def test_hostile_layer_is_refused(driver, case, open_storage, mount, tmp_path):
    outside = _outside(tmp_path)
    found = {c.name: c for c in hostile(outside)}[case]
    storage = open_storage(driver)
    storage.clone("base")
    apply_to(storage, "base", io.BytesIO(tar_bytes([member("ok", "dir"), member("ok/f")])))
    storage.snapshot("base", "layer")
    storage.clone("victim", "layer")
    with mount(storage, "victim") as path:
        before = treeinfo.record(path, mtimes=True)
    host_before = treeinfo.record(outside, mtimes=True)

    with pytest.raises(MinifsError) as refused:
        apply_to(storage, "victim", io.BytesIO(found.data), **found.options)

    message = str(refused.value)
    assert "\n" not in message and found.mentions in message, message
    with mount(storage, "victim") as path:
        assert treeinfo.differences(before, treeinfo.record(path, mtimes=True)) == []
    assert treeinfo.differences(host_before, treeinfo.record(outside, mtimes=True)) == []
    assert _strays(tmp_path) == []
    assert list((storage.state.root / "tmp").iterdir()) == []


def _no_image_stored(root: Path) -> None:
    blobs = root / "content" / "blobs" / "sha256"
    assert not blobs.exists() or list(blobs.iterdir()) == []


def test_import_refuses_image_with_hostile_layer(cli, root, tmp_path):
    good = tar_bytes([member("etc", "dir"), member("etc/ok", data=b"ok")])
    bad = tar_bytes([member("etc", "dir"), member("etc/../../escape", data=b"x")])
    archive = tmp_path / "bad.tar"
    archive.write_bytes(docker_archive([good, bad]))
    done = cli("image", "import", str(archive))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "etc/../../escape" in done.stderr
    _no_image_stored(root)
    listed = cli("image", "ls", "--json", check=True)
    assert json.loads(listed.stdout) == []
    assert _strays(tmp_path) == []


def test_import_refuses_paths_outside_the_archive(cli, root, tmp_path):
    layer = tar_bytes([member("f", data=b"x")])
    archive = tmp_path / "escape.tar"
    archive.write_bytes(docker_archive([layer], config_name="../../../etc/hostname"))
    done = cli("image", "import", str(archive))
    assert done.returncode == 2 and "outside the archive" in done.stderr
    _no_image_stored(root)


def test_import_refuses_layout_blob_linked_out(cli, root, tmp_path):
    """An OCI layout directory whose blob is a symlink to a host file."""
    layout = tmp_path / "layout"
    for info, data in oci_layout([tar_bytes([member("f", data=b"x")])]):
        path = layout / info.name
        if info.isdir():
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    manifest = layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    secret = _outside(tmp_path) / "secret"
    manifest.unlink()
    manifest.symlink_to(secret)
    done = cli("image", "import", str(layout))
    assert done.returncode == 2 and "outside" in done.stderr
    _no_image_stored(root)


def test_import_refuses_devices_when_asked(cli, root, tmp_path):
    layer = tar_bytes([member("dev", "dir"), member("dev/mem", "char", devmajor=1, devminor=1)])
    archive = tmp_path / "dev.tar"
    archive.write_bytes(docker_archive([layer]))
    done = cli("image", "import", "--no-devices", str(archive))
    assert done.returncode == 2 and "dev/mem" in done.stderr
    _no_image_stored(root)
    cli("image", "import", str(archive), check=True)
