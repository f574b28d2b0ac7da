"""What the results say, in words, computed from the data of one run.

Each finding compares drivers measured in the same run (on one machine, at
one time), and where the seed document made a claim the run can test ("CoW
writes twice", "CoW creates fast, RoW slowly", lookups search every layer,
many containers run out of inodes) it says whether the run confirms or
contradicts it. A `minifs bench --cli` run's findings are its comparisons of
minifs commands with their peers, against the targets the run recorded.
Nothing here holds a figure: a finding the data cannot support is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from minifs.output import human_size
from minifs_bench.results import BenchResult, CliTiming, DriverRun, Series

CONFIRMS, CONTRADICTS, MEASURED = "confirms the seed", "contradicts the seed", "measured"
MET, NOT_MET, NOT_MEASURED = "target met", "target not met", "not measured"

FULL_COPY = 0.5
"""A write that put at least this share of the file on the device copied it whole."""
IN_PLACE = 0.1
"""One that put at most this share wrote blocks, not the file."""
TWICE = (1.75, 2.5)
"""Amplification counted as "writes twice" (the seed's claim for CoW)."""
FLAT = 1.5
"""Depth cost ratios below this count as flat."""


@dataclass(frozen=True)
class Finding:
    verdict: str
    """CONFIRMS, CONTRADICTS or MEASURED; MET, NOT_MET or NOT_MEASURED for a
    command-line timing's comparison."""
    text: str


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def _us(value: float) -> str:
    return f"{value:.1f} µs"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def findings(result: BenchResult | CliTiming) -> list[Finding]:
    """Every finding the run supports, in the order the plots come."""
    if isinstance(result, CliTiming):
        return _timing(result)
    drivers = list(result.drivers.values())
    out: list[Finding] = []
    for make in (_create, _row, _copy_up, _twice, _lookup, _clones):
        out.extend(make(drivers))
    return out


def _create(drivers: list[DriverRun]) -> list[Finding]:
    with_latency = [(d, d.latency.points) for d in drivers if d.latency and d.latency.points]
    if not with_latency:
        return []
    first = [(d, points[0]) for d, points in with_latency]
    ranked = sorted(first, key=lambda dp: dp[1].create.median)
    depth = {p.depth for _, p in first}
    parts = [f"{_ms(p.create.median)} on {d.name}" for d, p in ranked]
    out = [
        Finding(
            MEASURED,
            f"Creating a clone (clone+mount) at depth {_listing(sorted(map(str, depth)))} took "
            f"{_listing(parts)} (medians).",
        )
    ]
    overheads = [
        f"{d.name} {p.create_overhead:.1f}x ({_ms(p.create.median)} against "
        f"{_ms(p.bare_create.median)})"
        for d, p in ranked
        if p.create_overhead is not None and p.bare_create is not None
    ]
    if overheads:
        out.append(
            Finding(
                MEASURED,
                "Over the bare kernel operation measured in the same run, minifs's create "
                f"costs {_listing(overheads)}.",
            )
        )
    growth = []
    for d, points in with_latency:
        if len(points) > 1:
            low, high = points[0], points[-1]
            growth.append(
                f"{d.name} {_ms(low.create.median)} at depth {low.depth} → "
                f"{_ms(high.create.median)} at {high.depth}"
            )
    if growth:
        out.append(Finding(MEASURED, f"Create against layer depth: {_listing(growth)}."))
    cow = [(d, p) for d, p in ranked if d.kind == "cow"]
    copy = [(d, p) for d, p in ranked if d.kind == "copy"]
    if cow and copy:
        slowest_cow = max(cow, key=lambda dp: dp[1].create.median)
        fastest_copy = min(copy, key=lambda dp: dp[1].create.median)
        faster = slowest_cow[1].create.median < fastest_copy[1].create.median
        out.append(
            Finding(
                CONFIRMS if faster else CONTRADICTS,
                f"The seed says CoW makes containers fast: the slowest CoW driver here "
                f"({slowest_cow[0].name}, {_ms(slowest_cow[1].create.median)}) creates "
                + ("faster" if faster else "no faster")
                + f" than the fastest full copy ({fastest_copy[0].name}, "
                f"{_ms(fastest_copy[1].create.median)}).",
            )
        )
    return out


def _row(drivers: list[DriverRun]) -> list[Finding]:
    created = {
        d.name: (d.kind, d.latency.points[0].create.median)
        for d in drivers
        if d.latency and d.latency.points
    }
    row = {n: ms for n, (kind, ms) in created.items() if kind == "row"}
    cow = {n: ms for n, (kind, ms) in created.items() if kind == "cow"}
    if not row or not cow:
        if created:
            return [
                Finding(
                    MEASURED,
                    "The seed says RoW creates and deletes slowly; this run has no "
                    + ("RoW" if not row else "CoW")
                    + " driver to compare, so the claim is not tested here.",
                )
            ]
        return []
    slow = min(row.values()) > max(cow.values())
    return [
        Finding(
            CONFIRMS if slow else CONTRADICTS,
            "The seed says RoW creates slowly: "
            + _listing([f"{n} (RoW) {_ms(ms)}" for n, ms in row.items()])
            + " against "
            + _listing([f"{n} (CoW) {_ms(ms)}" for n, ms in cow.items()])
            + ".",
        )
    ]


def _copy_up(drivers: list[DriverRun]) -> list[Finding]:
    updates = {
        d.name: d.amplification.updates()
        for d in drivers
        if d.amplification and d.amplification.updates()
    }
    if not updates:
        return []
    largest = max(u[-1].file_size for u in updates.values())
    at = {n: u[-1] for n, u in updates.items() if u[-1].file_size == largest}
    ranked = sorted(at.items(), key=lambda nw: -nw[1].device.median)
    parts = [f"{n} wrote {human_size(w.device.median)}" for n, w in ranked]
    out = [
        Finding(
            MEASURED,
            f"A 4-byte update in the middle of a {human_size(largest)} file of a lower layer: "
            f"{_listing(parts)} to the disk.",
        )
    ]
    for name, series in updates.items():
        small, big = series[0], series[-1]
        if big.device.median >= FULL_COPY * big.file_size:
            out.append(
                Finding(
                    MEASURED,
                    f"{name} copies the whole file up: the same 4 bytes cost "
                    f"{human_size(small.device.median)} in a {human_size(small.file_size)} "
                    f"file and {human_size(big.device.median)} in a "
                    f"{human_size(big.file_size)} one.",
                )
            )
        elif big.device.median <= IN_PLACE * big.file_size:
            clone = big.clone_device
            if clone is not None and clone.median >= FULL_COPY * big.file_size:
                out.append(
                    Finding(
                        MEASURED,
                        f"{name} writes little for the update ({human_size(big.device.median)})"
                        f" because it paid when the clone was made: "
                        f"{human_size(clone.median)} for the clone of the "
                        f"{human_size(big.file_size)} file's layer.",
                    )
                )
            else:
                out.append(
                    Finding(
                        MEASURED,
                        f"{name} writes blocks, not files: "
                        f"{human_size(small.device.median)} for the update in a "
                        f"{human_size(small.file_size)} file, {human_size(big.device.median)} "
                        f"in a {human_size(big.file_size)} one.",
                    )
                )
    return out


def _twice(drivers: list[DriverRun]) -> list[Finding]:
    """The seed: a CoW write is done twice (keep the old block, write the new)."""
    out = []
    for d in drivers:
        if d.kind != "cow" or not d.amplification:
            continue
        random = [w for w in d.amplification.others() if w.name == "random-4k"]
        if not random:
            continue
        w = random[0]
        x = w.amplification.median
        size = human_size(w.file_size)
        low, high = TWICE
        if low <= x <= high:
            verdict, how = CONFIRMS, "about twice"
        elif x < low:
            verdict, how = CONTRADICTS, "less than twice: the old blocks are not written again"
        elif w.device.median >= FULL_COPY * w.file_size:
            verdict = CONTRADICTS
            how = f"far more than twice: the first write copies the whole {size} file up"
        else:
            verdict, how = CONTRADICTS, "more than twice"
        out.append(
            Finding(
                verdict,
                f"The seed says CoW writes twice. {d.name} (CoW) wrote "
                f"{human_size(w.device.median)} for {human_size(w.logical_bytes)} of random "
                f"4 KiB overwrites in a lower-layer file, {x:.1f}x: {how}.",
            )
        )
    return out


def _depth_ratio(d: DriverRun, op: str, state: str) -> tuple[Series, Series, int, int] | None:
    points = d.lookup.points if d.lookup else ()
    if len(points) < 2:
        return None
    low, high = points[0].time(op, state), points[-1].time(op, state)
    if low is None or high is None:
        return None
    return low, high, points[0].depth, points[-1].depth


def _lookup(drivers: list[DriverRun]) -> list[Finding]:
    """The seed: a union filesystem looks a file up layer by layer, top down."""
    grows, flat = [], []
    for d in drivers:
        found = _depth_ratio(d, "miss", "first")
        if found is None:
            continue
        low, high, d_low, d_high = found
        text = f"{d.name} {_us(low.median)} through {d_low} → {_us(high.median)} through {d_high}"
        (grows if high.median >= FLAT * low.median else flat).append(text)
    out = []
    if grows:
        out.append(
            Finding(
                CONFIRMS,
                "The seed says a union filesystem searches its layers one by one: looking up "
                f"a missing name on a fresh mount grows with depth on {_listing(grows)}.",
            )
        )
    if flat:
        out.append(
            Finding(
                MEASURED,
                f"Depth costs nothing where the driver keeps full trees: {_listing(flat)}.",
            )
        )
    warm: dict[bool, list[str]] = {True: [], False: []}
    for d in drivers:
        found = _depth_ratio(d, "stat", "warm")
        if found is not None:
            low, high, d_low, d_high = found
            text = f"{d.name} {_us(low.median)} at depth {d_low} → {_us(high.median)} at {d_high}"
            warm[high.median < FLAT * low.median].append(text)
    if warm[True]:
        out.append(
            Finding(
                MEASURED,
                "Once cached (warm), a lookup costs the same at any depth: "
                f"{_listing(warm[True])}.",
            )
        )
    if warm[False]:
        out.append(
            Finding(
                MEASURED,
                f"Even cached (warm), a lookup grows with depth: {_listing(warm[False])}.",
            )
        )
    return out


def _clones(drivers: list[DriverRun]) -> list[Finding]:
    """The seed: many containers may run out of inodes."""
    out = []
    for d in drivers:
        run = d.footprint.scenario if d.footprint else None
        if run is None:
            continue
        clone = d.footprint.clone if d.footprint else None
        each = ""
        if clone is not None and clone.inodes is not None and clone.bytes is not None:
            each = (
                f" ({clone.inodes.median:.0f} inodes and {human_size(clone.bytes.median)} "
                "per clone)"
            )
        free = "" if run.bytes_free_at_end is None else human_size(run.bytes_free_at_end)
        if run.first_exhausted == "inodes":
            out.append(
                Finding(
                    CONFIRMS,
                    f"The seed warns that many containers run out of inodes: {d.name} ran out "
                    f"of inodes after {run.clones} clones on a {human_size(run.disk_size)} "
                    f"disk{each}, with {free} of space still free.",
                )
            )
        elif run.first_exhausted == "space":
            out.append(
                Finding(
                    MEASURED,
                    f"{d.name} ran out of space, not inodes, after {run.clones} clones on a "
                    f"{human_size(run.disk_size)} disk{each}.",
                )
            )
        if run.predicted is not None and run.predicted.clones:
            off = run.clones / run.predicted.clones - 1
            out.append(
                Finding(
                    MEASURED,
                    f"{d.name}: the first clone's cost predicted {run.predicted.clones:.0f} "
                    f"clones, {run.clones} fitted ({round(off * 100):+d}%).",
                )
            )
    return out


def _timing(timing: CliTiming) -> list[Finding]:
    """Each comparison of a minifs command with its peer, as a ratio of the
    medians with the figures behind it, and whether it met its target."""
    out = []
    for c in timing.comparisons:
        mine, peer = f"'{timing.name(c.minifs)}'", f"'{timing.name(c.peer)}'"
        if c.ratio is None or c.paired is None:
            out.append(Finding(NOT_MEASURED, f"{mine} against {peer}: {c.reason}."))
            continue
        a, b = timing.commands[c.minifs].samples, timing.commands[c.peer].samples
        rounds = f"{a.n}" if a.n == b.n else f"{a.n} and {b.n}"
        text = (
            f"{mine} took {c.ratio:.2f}x {peer}: {_ms(a.median)} against {_ms(b.median)} "
            f"(medians of {rounds} rounds; {c.paired:.2f}x paired round by round)"
        )
        if c.target is None:
            out.append(Finding(MEASURED, f"{text}; no target, for comparison only."))
        else:
            met = "met" if c.met else "not met"
            out.append(
                Finding(MET if c.met else NOT_MET, f"{text} (target {c.target:.1f}x: {met}).")
            )
    if timing.partial:
        why = "; ".join(timing.errors) or "it was interrupted"
        out.append(Finding(MEASURED, f"The run is partial ({why}): some rounds are missing."))
    return out
