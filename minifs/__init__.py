"""minifs: pluggable container storage drivers, a launcher and a benchmark lab.

The package root stays import-light on purpose: the CLI imports only what a
command needs, so `minifs --help` starts fast.
"""

__version__ = "0.1.0"
