"""Whether kernel dm-thin could serve the devicemapper driver on this machine.

The kernel engine (pool and thin devices through `dmsetup`) needs the
device-mapper driver and its thin-pool target. This machine has neither, so
minifs carries only the probe that says so, and the userspace pool serves;
`minifs drivers` shows the reason beside the backend.
"""

from __future__ import annotations

import functools
import subprocess


@functools.cache
def unavailable() -> str | None:
    """Why kernel dm-thin cannot be used here, or None when it can."""
    try:
        done = subprocess.run(
            ["dmsetup", "targets"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return "no dmsetup: apt-get install dmsetup"
    except subprocess.TimeoutExpired:
        return "dmsetup targets did not answer"
    targets = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    if done.returncode != 0 or "thin-pool" not in targets:
        return "no dm-thin: dmsetup targets lacks thin-pool"
    return None
