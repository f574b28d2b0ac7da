"""What pass 1 of an apply has seen so far, as a trie of path components.

Pass 1 must find duplicate entries, hard link targets, and entries that lie
below something the same layer makes a non-directory (a symlink a later entry
would be written through), whatever order the archive lists them in. A flat
dict keyed by path tuples needs every ancestor of every entry sliced and
hashed: quadratic in the depth, which a hostile layer of many 2,000-deep
entries turns into hours. Walking a trie costs one small dict lookup per
component, and both orders (the symlink first or the entry below it first)
are caught when the second one arrives.
"""

from __future__ import annotations

from minifs.layers.tarformat import DIR, BadLayer, show

Parts = tuple[bytes, ...]


class Seen:
    """Entry kinds by path; a node is `[kind or None, children or None]`."""

    def __init__(self) -> None:
        self._root: list = [None, None]

    def get(self, parts: Parts) -> str | None:
        node = self._root
        for name in parts:
            children = node[1]
            node = children.get(name) if children else None
            if node is None:
                return None
        return node[0]

    def add(self, parts: Parts, kind: str, label: bytes) -> None:
        """Record `parts` as `kind` (an entry type or "whiteout"); `label` is the
        entry's name as the archive gave it, for errors."""
        node = self._root
        last = len(parts) - 1
        for depth, name in enumerate(parts):
            children = node[1]
            if children is None:
                children = node[1] = {}
            child = children.get(name)
            if child is None:
                child = children[name] = [None, None]
            elif child[0] is not None and child[0] != DIR and depth < last:
                raise BadLayer(
                    f"entry {show(label)}: lies below {show(b'/'.join(parts[: depth + 1]))}, "
                    f"which this layer makes a {child[0]}"
                )
            node = child
        if node[0] is not None:
            raise BadLayer(f"entry {show(label)}: duplicate entry")
        if kind != DIR and node[1]:
            below = next(iter(node[1]))
            raise BadLayer(
                f"entry {show(label)}: this layer makes it a {kind} but also has "
                f"{show(b'/'.join((*parts, below)))} below it"
            )
        node[0] = kind
