"""Serving the Snapshots API on a unix socket until SIGTERM or SIGINT.

The socket is checked before anything else is made: its directory must exist
and be writable, a stale socket (nobody accepts on it) is removed, and one a
live process serves is refused, never taken over. On a signal the server
stops taking calls, lets those under way finish, closes the store and
removes its socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minifs.errors import BackendError, InUse, InvalidArgument, MissingPrerequisite, NotFound
from minifs.storage import Storage

log = logging.getLogger("minifs.snapshotter")

MAX_SOCKET_PATH = 107
"""sun_path holds 108 bytes, its terminating NUL included."""
GRACE_SECONDS = 10.0
"""How long calls under way may take to finish after a stop signal."""


def check_address(address: str) -> Path:
    """The socket path, once it is one this process may bind: a stale socket
    is removed, anything else in the way is refused in one line."""
    path = Path(os.path.abspath(address))
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"socket path {address!r} is longer than {MAX_SOCKET_PATH} bytes, the most a "
            "unix socket address holds; pick a shorter --address"
        )
    parent = path.parent
    if not parent.is_dir():
        raise NotFound(
            f"the directory of --address {address} ({parent}) does not exist; create it "
            "first (mkdir -p), or pick another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(
            f"cannot create a socket in {parent}: it is not writable (read-only or "
            "permissions); pick another --address"
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(
            f"--address {path} exists and is not a socket; remove it yourself, or pick another path"
        )
    owner = _live_owner(path)
    if owner is not None:
        raise InUse(
            f"{path} is served by a live process ({owner}); stop it first, or pick "
            "another --address"
        )
    path.unlink()
    log.info("removed the stale socket %s", path)
    return path


def _live_owner(path: Path) -> str | None:
    """Who accepts on socket `path` ("pid N"), or None when nobody does."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        return f"it could not be probed: {exc.strerror}"
    else:
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        return f"pid {pid}"
    finally:
        probe.close()


def _grpc_modules() -> tuple[Any, Any]:
    """grpc and the service, or one line saying how to get them."""
    # Drivers run helpers (cp, du, losetup): grpc's fork handlers would log
    # a line for each fork made while a call is under way, and are not needed
    # as no child ever uses grpc.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        import grpc
    except ImportError:
        raise MissingPrerequisite("grpcio is not installed; run 'make setup'") from None
    try:
        from minifs.snapshotter import service
    except ImportError as exc:
        raise MissingPrerequisite(
            f"the Snapshots API modules are not generated ({exc}); run 'make setup' "
            "(or python -m minifs.snapshotter.generate)"
        ) from None
    return grpc, service


def serve(address: str, open_storage: Callable[[], Storage], workers: int = 4) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="minifs snapshotter: %(message)s", force=True)
    path = check_address(address)
    grpc, service = _grpc_modules()
    snapshots = service.SnapshotService(open_storage)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"))
    service.snapshots_pb2_grpc.add_SnapshotsServicer_to_server(snapshots, server)
    try:
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            raise BackendError(f"cannot listen on {path} ({exc}); pick another --address") from None
        os.chmod(path, 0o600)  # the snapshots are root's: so is asking for them
        ours = os.stat(path).st_ino
        server.start()
        storage = snapshots.storage
        log.info("serving %s (%s) on %s", storage.name, storage.state.root, path)
        stop.wait()
        log.info("stopping")
        server.stop(GRACE_SECONDS).wait()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == ours:
                path.unlink()
    finally:
        server.stop(None)
        snapshots.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0
