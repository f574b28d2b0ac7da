"""`--trace`: the seed's walkthrough printed as it happens, step by step
with its duration, by whichever of the three processes takes the step."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator


class Trace:
    """`--trace`: one line per step with its duration, written straight to a
    file descriptor so the three processes never interleave half lines."""

    def __init__(self, enabled: bool, fd: int) -> None:
        self.enabled = enabled
        self.fd = fd
        self.start = time.perf_counter()

    def say(self, step: str, since: float, detail: str) -> None:
        if self.enabled and self.fd >= 0:
            ms = (time.perf_counter() - since) * 1000
            line = f"minifs trace  {step:<12} {ms:8.2f} ms  {detail}\n"
            with contextlib.suppress(OSError):
                os.write(self.fd, line.encode())

    def close(self) -> None:
        """Stop tracing: a detached caller waits for its stderr to close."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def step(self, step: str) -> Iterator[list[str]]:
        """`with trace.step("clone") as said: said.append(what was done)`."""
        since = time.perf_counter()
        said: list[str] = []
        yield said
        self.say(step, since, "; ".join(said))
