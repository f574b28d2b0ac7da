"""`minifs ls --filter`: which snapshots a filter keeps.

Apart from the Storage facade, so that `ls` (a reader that must start fast)
loads only the store and the model, not the drivers' machinery.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from minifs.errors import InvalidArgument
from minifs.model import Info, Kind


def parse_filters(filters: Sequence[str]) -> dict[str, str]:
    """`kind=layer`, `parent=NAME`, `label.KEY=VALUE`, `name=NAME` (all must hold).

    A kind that cannot exist is refused, as `docker ps --filter status=bogus`
    is: matching nothing would pass for "there are none".
    """
    parsed = {}
    kinds = "|".join(k.value for k in Kind)
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not (key in ("kind", "parent", "name") or key.startswith("label.")):
            raise InvalidArgument(
                f"bad filter {item!r}; use kind={kinds}, parent=NAME, name=NAME or label.KEY=VALUE"
            )
        if key == "kind" and value not in {k.value for k in Kind}:
            raise InvalidArgument(f"bad filter {item!r}; a kind is one of {kinds}")
        if key == "label.":
            raise InvalidArgument(f"bad filter {item!r}; name the label: label.KEY=VALUE")
        parsed[key] = value
    return parsed


def matches(info: Info, filters: Mapping[str, str]) -> bool:
    for key, value in filters.items():
        if key == "kind" and info.kind.value != value:
            return False
        if key == "parent" and info.parent != value:
            return False
        if key == "name" and info.name != value:
            return False
        if key.startswith("label.") and info.labels.get(key[6:]) != value:
            return False
    return True
