"""The built-in image: the host's static busybox with its applets linked.

So a new user has an image to start a container from without any registry.
The layer is written straight from the binary with `TarWriter` (no staging
tree on disk) and is reproducible: every entry takes the binary's mtime, so
the same busybox-static package always gives the same image digest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from minifs.errors import MissingPrerequisite
from minifs.images import oci
from minifs.images.catalog import Catalog
from minifs.layers.compression import GZIP, Compressor
from minifs.layers.tarformat import DIR, FILE, HARDLINK, Entry, TarWriter
from minifs.resources import run

NAME = "busybox:latest"
BINARY = Path("/bin/busybox")

_DIRS = {
    "bin": 0o755,
    "dev": 0o755,
    "etc": 0o755,
    "home": 0o755,
    "proc": 0o555,
    "root": 0o700,
    "run": 0o755,
    "sbin": 0o755,
    "sys": 0o555,
    "tmp": 0o1777,
    "usr": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "var": 0o755,
    "var/tmp": 0o1777,
}
_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
    "etc/group": "root:x:0:\nnobody:x:65534:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "etc/hostname": "busybox\n",
}


def _binary() -> Path:
    if not BINARY.is_file():
        raise MissingPrerequisite(
            f"{BINARY} is missing; install busybox-static ('make setup' does)"
        )
    return BINARY


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def _write_layer(tar: TarWriter, binary: Path) -> None:
    st = binary.stat()
    mtime = int(st.st_mtime) * 1_000_000_000
    applets = sorted(
        set(run([str(binary), "--list-full"], "list busybox applets").split()) - {"bin/busybox"}
    )
    dirs = dict(_DIRS)
    for applet in applets:
        parent = os.path.dirname(applet)
        while parent and parent not in dirs:
            dirs[parent] = 0o755
            parent = os.path.dirname(parent)
    for name, mode in sorted(dirs.items()):
        tar.add(Entry(name=name.encode(), type=DIR, mode=mode, mtime_ns=mtime))
        if name == "bin":
            tar.add(
                Entry(name=b"bin/busybox", type=FILE, mode=0o755, size=st.st_size, mtime_ns=mtime),
                _chunks(binary),
            )
    for name, text in sorted(_FILES.items()):
        data = text.encode()
        tar.add(
            Entry(name=name.encode(), type=FILE, mode=0o644, size=len(data), mtime_ns=mtime),
            iter([data]),
        )
    for applet in applets:
        tar.add(
            Entry(
                name=applet.encode(),
                type=HARDLINK,
                mode=0o755,
                mtime_ns=mtime,
                linkname=b"bin/busybox",
            )
        )
    tar.close()


def build(catalog: Catalog) -> str:
    """Build and publish the busybox image; returns its name."""
    binary = _binary()
    version = run([str(binary)], "busybox version").splitlines()[0].strip()
    with catalog.content.staging(catalog.scratch) as staging:
        path = staging.new_file()
        with open(path, "wb") as raw:
            blob = Compressor(raw, GZIP)
            tar = TarWriter(blob)  # type: ignore[arg-type]
            _write_layer(tar, binary)
            blob.finish()
        layer_digest = staging.adopt(path, "sha256:" + blob.digest.hexdigest())
        diff_id = "sha256:" + tar.digest.hexdigest()
        config = oci.config_for(
            [diff_id],
            {"Env": [oci.DEFAULT_PATH], "Cmd": ["sh"], "WorkingDir": "/"},
            f"minifs image busybox ({version})",
        )
        config_bytes = oci.dumps(config)
        config_digest = staging.add_bytes(config_bytes)
        manifest = oci.manifest_for(
            oci.descriptor(oci.OCI_CONFIG, config_digest, len(config_bytes)),
            [oci.descriptor(oci.LAYER_TYPES[GZIP], layer_digest, blob.size)],
        )
        digest = staging.add_bytes(oci.dumps(manifest))
        catalog.add(staging, [NAME], digest, {config_digest, layer_digest})
    return NAME
