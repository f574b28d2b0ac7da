"""Errors a user can act on.

Every error minifs raises on purpose is a `MinifsError`: the CLI prints its
message as one line and exits with its `exit_code`, never a traceback. Messages
say what was wrong and what to do, like `name "x" is taken; pick another name or
remove it with "minifs rm x"`.
"""


class MinifsError(Exception):
    """Base of the errors shown to users as one line."""

    exit_code = 2


class InvalidArgument(MinifsError):
    """A value the user gave cannot be used."""


class NotFound(MinifsError):
    """A name, driver or path that does not exist."""


class AlreadyExists(MinifsError):
    """A name that is already taken in this driver's store."""


class InUse(MinifsError):
    """An object that other objects still depend on (children, mounts)."""


class NotSupported(MinifsError):
    """The driver cannot run on this kernel or filesystem (Docker's ErrNotSupported)."""


class MissingPrerequisite(MinifsError):
    """A program or package the driver needs is not installed (ErrPrerequisites)."""


class TooManyLayers(MinifsError):
    """A clone would stack more layers than the backend can mount."""


class StateDirError(MinifsError):
    """The state directory cannot be used (not writable, wrong filesystem)."""


class BackendError(MinifsError):
    """A backend command or syscall failed; the message carries its own words."""


class Damaged(MinifsError):
    """A snapshot's backend object is missing or broken (changed behind minifs's back)."""
