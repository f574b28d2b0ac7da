"""Named crash points, so tests can SIGKILL an operation at an exact step.

`MINIFS_FAILPOINT=clone:after-intent minifs clone x` dies right after the
intent row is committed: the crash-recovery tests use this to prove `minifs gc`
brings every such state back to consistent. Unset, a failpoint costs one dict
lookup.
"""

from __future__ import annotations

import os
import signal


def hit(name: str) -> None:
    if os.environ.get("MINIFS_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
