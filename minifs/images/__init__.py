"""Images: OCI/Docker archives in a content store, unpacked lazily per driver.

The functions below are the contract the container launcher uses; they
import what they need when called, so importing this package stays cheap.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any

    from minifs.storage import Storage


def resolve_image(storage: Storage, ref: str) -> tuple[str, dict[str, Any]]:
    """(the name of a layer on `storage`'s driver for `ref`, the image's OCI
    config "config" object: Env, Cmd, Entrypoint, WorkingDir, User, ...).

    `ref` is an existing layer name (its config is {}) or an image, unpacked
    on this driver first if it is not yet; both answers come from one lookup
    of the image, whose manifest and config are read and checked once. A layer
    of that name wins over an image of that name. Raises NotFound with a
    one-line hint when `ref` is neither.
    """
    from minifs.errors import NotFound
    from minifs.images.catalog import Catalog, unpack
    from minifs.model import Kind

    storage.up()  # not held on: an unpack takes the lock step by step
    info = storage.find(ref)
    if info is not None and info.kind is Kind.LAYER:
        return ref, {}
    catalog = Catalog.of(storage)
    found = catalog.find(ref)
    if found is None:
        if info is not None:
            return ref, {}  # a clone or view: cloning it gives the usual error
        raise NotFound(
            f"no layer or image named {ref!r} on driver {storage.name}; see 'minifs ls' "
            "and 'minifs image ls', or add one with 'minifs image import PATH' "
            "or 'minifs image busybox'"
        )
    image = found[1]
    config = image.config.get("config")
    return unpack(storage, catalog, image), dict(config) if isinstance(config, dict) else {}


def resolve_layer(storage: Storage, ref: str) -> str:
    """The layer `resolve_image` finds for `ref`, for commands that only clone it."""
    return resolve_image(storage, ref)[0]


def ensure_busybox(root: str | os.PathLike[str] | None) -> str:
    """Build the busybox image unless it exists; returns its ref."""
    from minifs.images import busybox
    from minifs.images.catalog import Catalog

    with Catalog.open(root) as catalog, catalog.state.locked():
        if catalog.find(busybox.NAME) is None:
            busybox.build(catalog)
        return busybox.NAME
