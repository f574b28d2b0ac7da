"""Images: OCI/Docker archives in a content store, unpacked lazily per driver.

The three functions below are the contract the container launcher uses; they
import what they need when called, so importing this package stays cheap.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any

    from minifs.storage import Storage


def resolve_layer(storage: Storage, ref: str) -> str:
    """The name of a layer on `storage`'s driver for `ref`: an existing layer
    name, or an image (unpacked on this driver first if it is not yet).

    A layer of that name wins over an image of that name. Raises NotFound with
    a one-line hint when `ref` is neither.
    """
    from minifs.errors import NotFound
    from minifs.images.catalog import Catalog, unpack
    from minifs.model import Kind

    storage.up()  # not held on: an unpack takes the lock step by step
    info = storage.find(ref)
    if info is not None and info.kind is Kind.LAYER:
        return ref
    catalog = Catalog.of(storage)
    found = catalog.find(ref)
    if found is None:
        if info is not None:
            return ref  # a clone or view: cloning it gives the usual error
        raise NotFound(
            f"no layer or image named {ref!r} on driver {storage.name}; see 'minifs ls' "
            "and 'minifs image ls', or add one with 'minifs image import PATH' "
            "or 'minifs image busybox'"
        )
    return unpack(storage, catalog, found[1])


def image_config(root: str | os.PathLike[str] | None, ref: str) -> dict[str, Any]:
    """The image's OCI config "config" object (Env, Cmd, Entrypoint, WorkingDir,
    User, ...), or {} when `ref` is not an image (a plain layer name)."""
    from minifs.images.catalog import Catalog

    with Catalog.open(root) as catalog:
        found = catalog.find(ref)
        if found is None:
            return {}
        config = found[1].config.get("config")
        return dict(config) if isinstance(config, dict) else {}


def ensure_busybox(root: str | os.PathLike[str] | None) -> str:
    """Build the busybox image unless it exists; returns its ref."""
    from minifs.images import busybox
    from minifs.images.catalog import Catalog

    with Catalog.open(root) as catalog, catalog.state.locked():
        if catalog.find(busybox.NAME) is None:
            busybox.build(catalog)
        return busybox.NAME
