"""OCI image model: manifests, configs, diff_ids and chain ids.

An image is a manifest (a config blob and layer blobs) in the content store.
A layer's diff_id is the sha256 of its uncompressed tar; its chain id names the
stack of it and everything below (OCI image spec, "Layer ChainID"):
ChainID(L1) = DiffID(L1), ChainID(L1..Ln) = sha256(ChainID(L1..Ln-1) + " " +
DiffID(Ln)). Unpacked layers are named by chain id on each driver, so images
that share base layers share them there too.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from collections.abc import Sequence

from minifs.errors import InvalidArgument
from minifs.images.content import ContentStore, check_digest

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
FOREIGN = ("nondistributable", "foreign")

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def host_variant() -> str | None:
    return {"aarch64": "v8", "armv7l": "v7", "armv6l": "v6"}.get(os.uname().machine)


def host_platform() -> str:
    variant = host_variant()
    return f"linux/{host_arch()}" + (f"/{variant}" if variant and host_arch() == "arm" else "")


def platform_name(desc_platform: Any) -> str:
    if not isinstance(desc_platform, dict):
        return "any platform"
    parts = [desc_platform.get(key) for key in ("os", "architecture", "variant")]
    return "/".join(str(p) for p in parts if p)


def platform_matches(desc_platform: Any) -> bool:
    """Whether a descriptor's platform (absent: any) runs here: linux on this
    architecture, and the variant when one is given (arm64 v8 is its default)."""
    if not desc_platform:
        return True
    if not isinstance(desc_platform, dict):
        return False
    if desc_platform.get("os") != "linux" or desc_platform.get("architecture") != host_arch():
        return False
    variant = desc_platform.get("variant")
    return not variant or variant == host_variant()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    chain: list[str] = []
    for diff_id in diff_ids:
        if chain:
            from minifs.smallhash import sha256

            joined = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + sha256(joined).hexdigest())
        else:
            chain.append(diff_id)
    return chain


def dumps(document: dict[str, Any]) -> bytes:
    """Canonical JSON, so a synthesised manifest or config has a stable digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return document


def descriptor(media_type: str, digest: str, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def manifest_for(config: dict[str, Any], layers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": list(layers),
    }


def config_for(diff_ids: Sequence[str], config: dict[str, Any], history: str) -> dict[str, Any]:
    return {
        "architecture": host_arch(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": history}],
    }


class Layer(namedtuple("Layer", "digest media_type size diff_id chain_id")):
    """One layer of an image. (The image records are named tuples: a
    dataclass loads `inspect`, ~6 ms of every `minifs clone --from IMAGE`.)"""

    __slots__ = ()
    digest: str
    media_type: str
    size: int
    diff_id: str
    chain_id: str


class Image(namedtuple("Image", "digest manifest config_digest config layers")):
    """A manifest and its config, read back from the content store."""

    __slots__ = ()
    digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    layers: tuple[Layer, ...]

    @property
    def top(self) -> str | None:
        """The chain id of the whole stack: the layer a clone of the image sits on."""
        return self.layers[-1].chain_id if self.layers else None

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


def check_manifest(manifest: dict[str, Any], what: str) -> tuple[dict[str, Any], list[dict]]:
    """The config and layer descriptors of a manifest, checked for shape."""
    media_type = manifest.get("mediaType", OCI_MANIFEST)
    if media_type not in MANIFEST_TYPES:
        raise InvalidArgument(f"{what} has media type {media_type}, not an image manifest")
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise InvalidArgument(f"{what} lacks a config or layers list")
    for desc in [config, *layers]:
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
            raise InvalidArgument(f"{what} has a descriptor without a digest")
        check_digest(desc["digest"])
        if any(word in str(desc.get("mediaType", "")) for word in FOREIGN):
            raise InvalidArgument(
                f"{what} has a foreign (non-distributable) layer {desc['digest']}, "
                "which is not in the archive"
            )
    return config, layers


def diff_ids_of(config: dict[str, Any], count: int, what: str) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != count:
        raise InvalidArgument(f"{what}: config's rootfs.diff_ids does not match its {count} layers")
    return [check_digest(d) for d in diff_ids]


def load(content: ContentStore, digest: str) -> Image:
    manifest = parse_json(content.read(digest), f"manifest {digest}")
    config_desc, layer_descs = check_manifest(manifest, f"manifest {digest}")
    config = parse_json(content.read(config_desc["digest"]), f"config {config_desc['digest']}")
    diff_ids = diff_ids_of(config, len(layer_descs), f"image {digest}")
    layers = tuple(
        Layer(
            digest=desc["digest"],
            media_type=desc.get("mediaType", ""),
            size=int(desc.get("size", 0)),
            diff_id=diff_id,
            chain_id=chain_id,
        )
        for desc, diff_id, chain_id in zip(layer_descs, diff_ids, chain_ids(diff_ids), strict=True)
    )
    return Image(digest, manifest, config_desc["digest"], config, layers)
