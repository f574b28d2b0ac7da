"""containerd's Snapshots API: the vendored .proto files and, once `make setup`
ran `python -m minifs.snapshotter.generate`, the modules grpcio-tools makes
from them (not kept in git, so they always match the installed protobuf)."""
