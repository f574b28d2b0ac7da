"""The `minifs` script (and `python -m minifs`): the process settings of a
short-lived command line, made before `minifs.cli` and what it imports load.

The garbage collector's young generation is collected every 700 new
objects by default. Loading minifs's and the standard library's modules makes
about 10,000, so a `minifs run` paid 13 collections (~3 ms, one of them of
the older generation) to find almost no garbage: the modules live until the
process ends. A larger threshold keeps collections for processes that go on
allocating (a benchmark, the snapshotter's server, a monitor that waits for
hours), just less often; cycles they leave live a little longer.
"""

import gc
import os
import sys

gc.set_threshold(20_000, 10, 10)

from minifs.cli import main  # noqa: E402


def entry() -> int:
    """`main`, then, when the interpreter's own exit has nothing left to do
    (output flushed, no other thread, no exit hook), an exit that skips
    tearing down every module it loaded: ~3 ms of a `minifs run`, more than
    the container's whole mount setup."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        return code  # the usual exit reports it
    import atexit

    if "threading" not in sys.modules and atexit._ncallbacks() == 0:
        os._exit(code & 0xFF)
    return code


if __name__ == "__main__":
    sys.exit(entry())
