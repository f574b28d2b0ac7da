"""Named points where tests stop an operation at an exact step.

`MINIFS_FAILPOINT=clone:after-intent minifs clone x` dies (SIGKILL) right after
the intent row is committed: the crash-recovery tests use this to prove `minifs
gc` brings every such state back to consistent. With `MINIFS_FAILPOINT_ACTION=stop`
the process stops itself (SIGSTOP) there instead, so a test can show what other
commands do meanwhile and let it go on with SIGCONT. Unset, a failpoint costs
one dict lookup.
"""

from __future__ import annotations

import os
import signal


def hit(name: str) -> None:
    if os.environ.get("MINIFS_FAILPOINT") == name:
        stop = os.environ.get("MINIFS_FAILPOINT_ACTION") == "stop"
        os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)
