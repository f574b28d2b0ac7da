"""The container launcher: the seed's hand-built container as a program.

`minifs run` clones an image's layer on any driver and starts a command in it
as PID 1 of new pid, mount, uts, ipc, net and cgroup namespaces, through the
steps the seed walks through by hand: clone, cgroup, fork, unshare, fork, veth,
pivot_root, mount proc, hostname, exec. `launch.py` runs the three processes,
`lifecycle.py` makes and removes what a container holds (record, clone,
cgroup, address), `rootfs.py`, `cgroups.py` and `network.py` are the steps
themselves, `process.py` what run and exec share around exec, and `manage.py`
what acts on a running or stopped container (ps, stop, exec, logs, rm).

Importing this package is cheap; every module imports what it needs itself, so
`minifs --help` never pays for pyroute2.
"""

from __future__ import annotations

from minifs.errors import MinifsError


class ContainerError(MinifsError):
    """A container could not be created or started (bad image, limit, name...).

    Exit code 125, as docker uses for its own errors, so a script can tell
    "minifs failed" from "the command in the container failed".
    """

    exit_code = 125
