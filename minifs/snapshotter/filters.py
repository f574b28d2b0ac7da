"""containerd's filter language, as its List requests use it.

A filter is selectors joined by `,` (all must hold); a request's several
filters are alternatives (any may hold). A selector is a field path
(`kind`, `name`, `parent`, `labels."containerd.io/snapshot.ref"`), then
`==`, `!=` or `~=` (a regular expression) and a value, or nothing to ask
whether the field is present. Quoting follows containerd's scanner: a
field may be quoted with `"`, a `~=` value also with `/` or `|`, with Go's
escapes. Ported from containerd's filters package (scanner.go, parser.go):
containerd's garbage collector and `ctr snapshots ls` send these.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from minifs.errors import InvalidArgument

Fields = Callable[[list[str]], tuple[str, bool]]
"""An object seen through its fields: path -> (value, present)."""

_QUOTES = '/|"'
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str  # "?", "==", "!=", "~="
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, fields: Fields) -> bool:
        value, present = fields(list(self.path))
        if self.op == "?":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


Filter = list[Selector]


class _Parser:
    """One filter string, scanned as containerd's scanner does: after an
    operator the next word is a value (up to a comma or a space)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> InvalidArgument:
        return InvalidArgument(
            f"bad filter {self.text[:200]!r} at character {self.pos}: {why}; write "
            'FIELD==VALUE joined by commas, e.g. kind==committed,labels."KEY"==VALUE'
        )

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while (ch := self.peek()) == ",":
            self.pos += 1
            selectors.append(self.selector())
        if ch:
            raise self.fail(f"unexpected {ch!r}")
        return selectors

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in (",", ""):
            return Selector(tuple(path), "?")
        op = self.operator()
        value = self.value(alt_quotes=op == "~=")
        if op != "~=":
            return Selector(tuple(path), op, value)
        try:
            return Selector(tuple(path), op, value, re.compile(value))
        except re.error as exc:
            raise self.fail(f"bad regular expression {value!r} ({exc})") from None

    def field(self) -> str:
        ch = self.peek()
        if ch in _QUOTES and ch:
            return self.quoted(alt_quotes=False)
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isascii()
            and (self.text[self.pos].isalnum() or self.text[self.pos] == "_")
        ):
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a field name or a quoted one")
        return self.text[start : self.pos]

    def operator(self) -> str:
        self.peek()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "=!~":
            self.pos += 1
        op = self.text[start : self.pos]
        if op not in ("==", "!=", "~="):
            raise self.fail(f'expected "==", "!=" or "~=" after the field, not {op!r}')
        return op

    def value(self, alt_quotes: bool) -> str:
        ch = self.peek()
        if not ch or ch in ",.=!~":
            raise self.fail("expected a value")
        if ch in _QUOTES:
            return self.quoted(alt_quotes)
        start = self.pos
        while self.pos < len(self.text) and not (
            self.text[self.pos] == "," or self.text[self.pos].isspace()
        ):
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self, alt_quotes: bool) -> str:
        quote = self.text[self.pos]
        if quote != '"' and not alt_quotes:
            raise self.fail(f'{quote!r} quotes only a regular expression (after ~=); use "')
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.fail("quoted text not terminated")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            out.append(self.escape(quote))

    def escape(self, quote: str) -> str:
        ch = self.text[self.pos : self.pos + 1]
        self.pos += 1
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        if ch in ("\\", quote):
            return ch
        digits = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}.get(ch)
        if ch and ch in "01234567":
            self.pos -= 1
            digits = (8, 3)
        if digits is None:
            raise self.fail(f"illegal escape \\{ch}")
        base, count = digits
        text = self.text[self.pos : self.pos + count]
        try:
            if len(text) != count:
                raise ValueError(text)
            code = int(text, base)
            self.pos += count
            return chr(code)
        except ValueError:
            raise self.fail(f"illegal numeric escape {text!r}") from None


def parse(filters: Sequence[str]) -> list[Filter]:
    """Each filter string parsed. An empty one matches everything, so with
    one among them the rest need not be looked at (containerd's `Always`)."""
    if "" in filters:
        return []
    return [_Parser(text).parse() for text in filters]


def matches(parsed: list[Filter], fields: Fields) -> bool:
    """Whether any filter (all of its selectors) holds; no filters: all do."""
    return not parsed or any(all(s.match(fields) for s in f) for f in parsed)
