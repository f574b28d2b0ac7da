"""Mutable records with named, defaulted fields, without dataclasses.

`minifs run` builds two of them (the run's Spec, the Container record) on
every start, and importing dataclasses (with inspect, copy and ast behind it)
costs a command ~5 ms, more than the whole overlay clone. A subclass
annotates its fields as for a dataclass, a default as the class attribute
(none: the field must be given); a list or dict default is copied for each
record, as dataclasses' `default_factory` would make one.
"""

from __future__ import annotations

_REQUIRED = object()


class Record:
    FIELDS: dict[str, object] = {}
    """Field name -> default, in declaration order; set for each subclass."""

    def __init_subclass__(cls) -> None:
        # Not inspect.get_annotations: importing inspect is what this module avoids.
        names = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
        cls.FIELDS = {name: cls.__dict__.get(name, _REQUIRED) for name in names}

    def __init__(self, **values: object) -> None:
        unknown = values.keys() - self.FIELDS.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        for key, default in self.FIELDS.items():
            if key in values:
                value = values[key]
            elif default is _REQUIRED:
                raise TypeError(f"{type(self).__name__} needs {key}")
            else:
                value = default.copy() if isinstance(default, (list, dict)) else default
            setattr(self, key, value)

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={getattr(self, key)!r}" for key in self.FIELDS)
        return f"{type(self).__name__}({shown})"
