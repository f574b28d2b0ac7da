"""Built-in minifs storage drivers, each a plugin in the `minifs` entry-point group.

They are registered in pyproject.toml exactly as a third-party package would
register its own; nothing in the core imports them.
"""
