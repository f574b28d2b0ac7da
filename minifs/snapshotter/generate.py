"""Generate the Python modules of containerd's Snapshots API with grpcio-tools.

Run at set-up time (`make setup` runs `python -m minifs.snapshotter.generate`):
the generated code checks at import that the protobuf and grpcio it runs on
are at least as new as the grpcio-tools that made it, so the three are pinned
together in pyproject.toml and the modules are made on each machine instead
of being kept in git.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from minifs.errors import MissingPrerequisite

API = Path(__file__).parent / "api"
PROTOS = ("mount.proto", "snapshots.proto")


def generate() -> list[Path]:
    """Write mount_pb2.py, snapshots_pb2.py and snapshots_pb2_grpc.py beside
    their .proto files; returns them."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise MissingPrerequisite(
            "grpcio-tools is not installed; run 'make setup' (or pip install -e '.[dev]')"
        ) from None
    # Imported by their paths inside the package, so the modules import each
    # other as minifs.snapshotter.api.* (see api/NOTICE).
    top = API.parents[2]
    well_known = resources.files("grpc_tools") / "_proto"
    names = [str((API / p).relative_to(top)) for p in PROTOS]
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{top}",
            f"-I{well_known}",
            f"--python_out={top}",
            f"--grpc_python_out={top}",
            *names,
        ]
    )
    if status != 0:
        raise MissingPrerequisite(f"protoc failed on {', '.join(names)} (exit {status})")
    made = [API / "mount_pb2.py", API / "snapshots_pb2.py", API / "snapshots_pb2_grpc.py"]
    # protoc also writes an empty *_pb2_grpc.py for mount.proto, which has no service.
    (API / "mount_pb2_grpc.py").unlink(missing_ok=True)
    return made


def main() -> int:
    try:
        made = generate()
    except MissingPrerequisite as exc:
        print(f"minifs: error: {exc}", file=sys.stderr)
        return 2
    print(f"generated {', '.join(p.name for p in made)} in {API}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
