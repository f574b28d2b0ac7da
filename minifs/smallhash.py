"""SHA-256 of small inputs (a manifest, a config, a chain id, a cache key)
without loading OpenSSL.

hashlib's first import loads libcrypto, about 3 ms of a process's start, and
a container start paid it twice for a few kilobytes: the monitor checks the
image's manifest and config against their digests, and PID 1 names its cached
seccomp filter. CPython's own SHA-256 (what hashlib itself falls back to where
OpenSSL is missing) gives the same digests with nothing to load. Layer tars
and other large data still go through hashlib, whose OpenSSL code is several
times faster per byte.
"""

try:
    from _sha256 import sha256  # CPython 3.11
except ImportError:  # pragma: no cover - the module's name from 3.12 on
    try:
        from _sha2 import sha256
    except ImportError:  # an interpreter without CPython's built-in hashes
        from hashlib import sha256

__all__ = ["sha256"]
