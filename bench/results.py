"""The results file: versioned JSON with every raw sample, the settings and the
machine, written atomically so a reader never sees half a file, and read back
through one typed reader (`read`, `parse`) that is the only place outside the
metrics themselves that spells the file's keys: the terminal tables
(minifs_bench.report) and `minifs report`'s plots both read through it.

Schema `minifs-bench` version 1, top level:
  schema, schema_version, partial, interrupted, errors, command, started_at,
  finished_at, wall_seconds, source (minifs version, git commit and whether the
  checkout was dirty), settings, machine, skipped (drivers that cannot
  run here, with the reason), drivers: {name: {driver, disk, phases_seconds,
  wall_seconds, errors, metrics: {latency|amplification|lookup|footprint:
  {status, definitions, ...raw samples and summaries...}}}}.

Version 1 grew fields over time (the idle-flush baseline and `*_net` bytes of
amplification came later): the reader takes what a file has and leaves the
rest None, so an old reference run still reads.

`minifs bench --cli` (minifs_bench.cli_timing) writes schema
`minifs-bench-cli` version 1: whole commands timed beside their peers (its
module docstring lists the keys). `read` takes either kind and returns a
BenchResult or a CliTiming; `load` and `parse` are the storage bench's alone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from minifs.errors import InvalidArgument
from minifs_bench.stats import percentile, ratio

SCHEMA = "minifs-bench"
SCHEMA_VERSION = 1
KNOWN_VERSIONS = (1,)
"""Versions this reader understands; a file of any other is refused by name."""
CLI_SCHEMA = "minifs-bench-cli"
CLI_SCHEMA_VERSION = 1
CLI_KNOWN_VERSIONS = (1,)
"""The same for `minifs bench --cli` files (its writer, cli_timing, spells the
same name and version; a test holds the two together)."""


def new_document(settings: dict, machine: dict, source: dict, command: list[str]) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "partial": False,
        "interrupted": False,
        "errors": [],
        "command": command,
        "started_at": _iso(time.time()),
        "finished_at": None,
        "wall_seconds": None,
        "source": source,
        "settings": settings,
        "machine": machine,
        "skipped": {},
        "drivers": {},
    }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def finish(doc: dict, wall_seconds: float) -> None:
    doc["finished_at"] = _iso(time.time())
    doc["wall_seconds"] = wall_seconds


DIRECTORY = Path("results")
"""Where results go by default, relative to the working directory (`make bench`
runs in the checkout, so reference runs land in its results/)."""


def default_path(label: str, when: float) -> Path:
    return DIRECTORY / f"{label}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}.json"


def save(doc: dict, path: Path) -> None:
    text = json.dumps(doc, indent=1, default=_jsonable) + "\n"
    if path.exists() and not path.is_file():
        path.write_text(text)  # /dev/stdout, a fifo: write through it, never replace it
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in results")


class ResultError(InvalidArgument, ValueError):
    """A file that is not a bench result this minifs can read; the message
    names the file and says what to do."""


def load(path: Path) -> dict:
    """Read a results file as a dict, refusing one that is not JSON, of another
    schema or of a version this reader does not know."""
    doc = _document(path)
    if doc.get("schema") != SCHEMA:
        raise ResultError(
            f"{path} is not a minifs bench result (no schema {SCHEMA!r}); "
            "name a file 'minifs bench' wrote"
        )
    return _checked(doc, path, SCHEMA_VERSION, KNOWN_VERSIONS)


def _document(path: Path) -> dict:
    """The JSON object in `path`, or a one-line ResultError."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ResultError(f"{path}: no such file; name a results/*.json file") from None
    except IsADirectoryError:
        raise ResultError(f"{path} is a directory; name the JSON files in it") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ResultError(
            f"{path} is not a minifs bench result (not JSON); name a file 'minifs bench' wrote"
        ) from None
    if not isinstance(doc, dict):
        raise ResultError(
            f"{path} is not a minifs bench result (not a JSON object); "
            "name a file 'minifs bench' wrote"
        )
    return doc


def _checked(doc: dict, path: Path, current: int, known: tuple[int, ...]) -> dict:
    """`doc` if this reader knows its schema version; a one-line ResultError
    saying whether to upgrade minifs otherwise."""
    version = doc.get("schema_version")
    if version not in known:
        if isinstance(version, int) and version > current:
            raise ResultError(
                f"{path} has {doc['schema']} schema version {version}; this minifs reads "
                f"{current}: upgrade minifs"
            )
        raise ResultError(
            f"{path} has unknown schema version {version!r} ({doc['schema']}); this minifs "
            f"reads {', '.join(map(str, known))}"
        )
    return doc


# -- the typed reader -------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """The raw samples of one quantity; every figure shown is computed from
    them (the summaries in the file were computed the same way)."""

    samples: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float | None] | None) -> Series | None:
        """None for no samples, or for a count the driver does not keep (any
        sample None: btrfs and zfs have no inode count)."""
        got = list(values or ())
        if not got or any(v is None for v in got):
            return None
        return cls(tuple(float(v) for v in got))  # type: ignore[arg-type]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p95(self) -> float:
        return percentile(self.samples, 95)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def scaled(self, factor: float) -> Series:
        return Series(tuple(v * factor for v in self.samples))


def median_ratio(top: Series | None, bottom: Series | None) -> float | None:
    """Median of `top` over median of `bottom`: the bench's overhead figures."""
    if top is None or bottom is None:
        return None
    return ratio(top.median, bottom.median)


@dataclass(frozen=True)
class LatencyPoint:
    """Create and delete at one depth, through minifs, the driver alone and by hand (ms)."""

    depth: int
    create: Series
    delete: Series
    driver_create: Series | None
    driver_delete: Series | None
    bare_create: Series | None
    bare_delete: Series | None

    @property
    def create_overhead(self) -> float | None:
        return median_ratio(self.create, self.bare_create)

    @property
    def delete_overhead(self) -> float | None:
        return median_ratio(self.delete, self.bare_delete)


@dataclass(frozen=True)
class Latency:
    bare: str | None
    """What the bare operation is, in words; None where the driver has none."""
    points: tuple[LatencyPoint, ...]
    commit: Series | None
    definitions: dict[str, str]


@dataclass(frozen=True)
class Workload:
    """One write pattern's bytes on the device; `device` is net of the idle
    flush where the file records it, raw otherwise."""

    name: str
    file_size: int
    """Size of the lower-layer file it writes into; 0 for new files."""
    logical_bytes: int
    device: Series
    clone_device: Series | None
    clone_inodes: Series | None
    seconds: Series | None

    @property
    def amplification(self) -> Series:
        return self.device.scaled(1 / self.logical_bytes)


UPDATE = "update-4b"
"""The workload that writes 4 bytes into lower-layer files of growing size."""


@dataclass(frozen=True)
class Amplification:
    workloads: tuple[Workload, ...]
    idle_flush: Series | None
    net: bool
    """Whether device bytes are net of the idle flush (files before it: raw)."""
    definitions: dict[str, str]

    def updates(self) -> list[Workload]:
        """The 4-byte updates, smallest file first."""
        return sorted((w for w in self.workloads if w.name == UPDATE), key=lambda w: w.file_size)

    def others(self) -> list[Workload]:
        return [w for w in self.workloads if w.name != UPDATE]


LOOKUP_OPS = ("stat", "read", "miss")
CACHE_STATES = ("cold", "first", "warm")


@dataclass(frozen=True)
class LookupPoint:
    depth: int
    times: dict[tuple[str, str], Series]
    """(op, cache state) -> µs."""
    not_cold: int

    def time(self, op: str, state: str) -> Series | None:
        return self.times.get((op, state))


@dataclass(frozen=True)
class Lookup:
    points: tuple[LookupPoint, ...]
    not_cold: int
    placement: str | None
    definitions: dict[str, str]


@dataclass(frozen=True)
class Cost:
    """What one layer or one (mounted) clone took on the bench disk, and what
    the driver's own usage() said; inodes None where the driver keeps no count."""

    inodes: Series | None
    bytes: Series | None
    driver_inodes: Series | None
    driver_bytes: Series | None


@dataclass(frozen=True)
class Prediction:
    clones: float | None
    first_exhausted: str | None
    inodes_per_clone: float | None
    bytes_per_clone: float | None


@dataclass(frozen=True)
class Scenario:
    """Clones of the image made on a small disk until one failed."""

    disk_size: int
    clones: int
    bound: int
    first_exhausted: str
    bytes_free_at_end: int | None
    predicted: Prediction | None


@dataclass(frozen=True)
class Footprint:
    layer: Cost | None
    clone: Cost | None
    bench_disk: Prediction | None
    scenario: Scenario | None
    definitions: dict[str, str]


def _opening_of_last(text: str) -> int | None:
    """Where the parenthesis that closes `text` opens (balanced), or None."""
    if not text.endswith(")"):
        return None
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


@dataclass(frozen=True)
class DriverRun:
    """One driver's results within one bench run."""

    name: str
    kind: str
    backend: str
    version: str | None
    disk_filesystem: str | None
    errors: tuple[str, ...]
    wall_seconds: float | None
    status: dict[str, str]
    latency: Latency | None = None
    amplification: Amplification | None = None
    lookup: Lookup | None = None
    footprint: Footprint | None = None

    @property
    def label(self) -> str:
        """The driver with its backend, as legends show it: "zfs (zfs-fuse)",
        "overlay2 (kernel overlayfs)". A parenthesis closing the backend is its
        short form; one that holds parentheses of its own is a remark instead
        (a reason, as older devicemapper results carry), and the words before
        it name the backend."""
        backend = self.backend or "unknown backend"
        opening = _opening_of_last(backend)
        if opening is not None:
            inner = backend[opening + 1 : -1]
            backend = inner if "(" not in inner else backend[:opening].strip()
        return f"{self.name} ({backend})"

    def metrics(self) -> list[str]:
        """Metrics with data, in the bench's order."""
        return [m for m in METRIC_NAMES if getattr(self, m) is not None]


METRIC_NAMES = ("latency", "amplification", "lookup", "footprint")


@dataclass(frozen=True)
class Machine:
    kernel: str
    cpu: str
    cpus: int | None
    memory_bytes: int | None
    python: str | None
    bench_disk_on: str
    """The filesystem and device the bench images lived on, e.g. "ext4 on /dev/vda"."""


@dataclass(frozen=True)
class BenchResult:
    path: Path
    schema_version: int
    started_at: str
    wall_seconds: float | None
    partial: bool
    errors: tuple[str, ...]
    layers: int | None
    runs: int | None
    depths: tuple[int, ...]
    machine: Machine
    git_commit: str | None
    git_dirty: bool
    skipped: dict[str, str]
    drivers: dict[str, DriverRun] = field(default_factory=dict)

    def metrics(self) -> set[str]:
        return {m for d in self.drivers.values() for m in d.metrics()}


def read(path: Path) -> BenchResult | CliTiming:
    """A results file of either kind, typed; ResultError (one line naming the
    file) otherwise."""
    doc = _document(path)
    if doc.get("schema") == CLI_SCHEMA:
        return parse_cli(_checked(doc, path, CLI_SCHEMA_VERSION, CLI_KNOWN_VERSIONS), Path(path))
    if doc.get("schema") != SCHEMA:
        raise ResultError(
            f"{path} is not a minifs bench result (no schema {SCHEMA!r} or {CLI_SCHEMA!r}); "
            "name a file 'minifs bench' or 'minifs bench --cli' wrote"
        )
    return parse(_checked(doc, path, SCHEMA_VERSION, KNOWN_VERSIONS), Path(path))


T = TypeVar("T")


def parse(doc: Mapping[str, Any], path: Path) -> BenchResult:
    """The typed form of a document `load` accepted (or one a run is writing:
    an interrupted metric keeps the points it finished)."""
    return _guarded(_result, doc, path, "minifs bench")


def _guarded(
    reader: Callable[[Mapping[str, Any], Path], T], doc: Mapping[str, Any], path: Path, run: str
) -> T:
    """`reader`'s result, or one line naming the damaged file and what to run again."""
    try:
        return reader(doc, path)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        raise ResultError(
            f"{path} is a damaged minifs bench result ({type(exc).__name__}: {exc}); "
            f"run '{run}' again"
        ) from None


def _result(doc: Mapping[str, Any], path: Path) -> BenchResult:
    settings = doc.get("settings") or {}
    machine = doc.get("machine") or {}
    source = doc.get("source") or {}
    return BenchResult(
        path=path,
        schema_version=doc["schema_version"],
        started_at=str(doc.get("started_at") or ""),
        wall_seconds=doc.get("wall_seconds"),
        partial=bool(doc.get("partial")),
        errors=tuple(doc.get("errors") or ()),
        layers=settings.get("layers"),
        runs=settings.get("runs"),
        depths=tuple(settings.get("depths") or ()),
        machine=_machine(machine),
        git_commit=source.get("git_commit"),
        git_dirty=bool(source.get("git_dirty")),
        skipped=dict(doc.get("skipped") or {}),
        drivers={name: _driver(name, entry) for name, entry in doc["drivers"].items()},
    )


def _machine(machine: Mapping[str, Any]) -> Machine:
    disk_on = machine.get("bench_images_on") or {}
    return Machine(
        kernel=str(machine.get("kernel", "unknown")),
        cpu=str(machine.get("cpu", "unknown")),
        cpus=machine.get("cpus"),
        memory_bytes=machine.get("memory_bytes"),
        python=machine.get("python"),
        bench_disk_on=f"{disk_on.get('type', 'unknown')} on {disk_on.get('source', '?')}",
    )


def _driver(name: str, entry: Mapping[str, Any]) -> DriverRun:
    info = entry.get("driver") or {}
    records = entry.get("metrics") or {}
    readers: dict[str, Callable[[Mapping[str, Any]], Any]] = {
        "latency": _latency,
        "amplification": _amplification,
        "lookup": _lookup,
        "footprint": _footprint,
    }
    parsed = {
        metric: reader(records[metric])
        for metric, reader in readers.items()
        if records.get(metric, {}).get("definitions")
    }
    return DriverRun(
        name=name,
        kind=str(info.get("kind", "unknown")),
        backend=str(info.get("backend", "")),
        version=info.get("version"),
        disk_filesystem=(entry.get("disk") or {}).get("filesystem"),
        errors=tuple(entry.get("errors") or ()),
        wall_seconds=entry.get("wall_seconds"),
        status={m: str(r.get("status")) for m, r in records.items()},
        **parsed,
    )


def _latency(record: Mapping[str, Any]) -> Latency:
    points = []
    for point in record.get("points", ()):
        samples = point.get("samples_ms") or {}
        create, delete = Series.of(samples.get("create")), Series.of(samples.get("delete"))
        if create is None or delete is None:
            continue  # interrupted before its first sample
        points.append(
            LatencyPoint(
                depth=point["depth"],
                create=create,
                delete=delete,
                driver_create=Series.of(samples.get("driver_create")),
                driver_delete=Series.of(samples.get("driver_delete")),
                bare_create=Series.of(samples.get("bare_create")),
                bare_delete=Series.of(samples.get("bare_delete")),
            )
        )
    commit = record.get("commit") or {}
    return Latency(
        bare=record.get("bare"),
        points=tuple(points),
        commit=Series.of(s["commit_ms"] for s in commit.get("samples", ())),
        definitions=dict(record["definitions"]),
    )


def _amplification(record: Mapping[str, Any]) -> Amplification:
    workloads = []
    net = True
    for entry in record.get("workloads", ()):
        samples = entry.get("samples") or []
        if not samples:
            continue

        def column(key: str, rows: list = samples) -> Series | None:
            return Series.of(s.get(key) for s in rows)

        device = column("device_bytes_net")
        if device is None:
            net = False
            device = column("device_bytes")
        clone = column("clone_device_bytes_net") if net else column("clone_device_bytes")
        workloads.append(
            Workload(
                name=entry["workload"],
                file_size=int(entry["file_size"]),
                logical_bytes=int(entry["logical_bytes"]),
                device=device,  # type: ignore[arg-type]
                clone_device=clone,
                clone_inodes=column("clone_inodes"),
                seconds=column("seconds"),
            )
        )
    idle = (record.get("idle_flush") or {}).get("samples")
    return Amplification(
        workloads=tuple(workloads),
        idle_flush=Series.of(idle),
        net=net and bool(workloads),
        definitions=dict(record["definitions"]),
    )


def _lookup(record: Mapping[str, Any]) -> Lookup:
    points = []
    for point in record.get("points", ()):
        samples = point.get("samples_us") or {}
        times = {
            (op, state): series
            for op in LOOKUP_OPS
            for state in CACHE_STATES
            if (series := Series.of(samples.get(f"{op}_{state}"))) is not None
        }
        if times:
            points.append(LookupPoint(point["depth"], times, int(point.get("not_cold") or 0)))
    return Lookup(
        points=tuple(points),
        not_cold=int(record.get("not_cold") or 0),
        placement=record.get("placement"),
        definitions=dict(record["definitions"]),
    )


def _cost(record: Mapping[str, Any] | None, suffix: str) -> Cost | None:
    samples = (record or {}).get("samples") or []
    if not samples:
        return None

    def column(key: str) -> Series | None:
        return Series.of(s.get(key) for s in samples)

    return Cost(
        inodes=column("inodes" + suffix),
        bytes=column("bytes" + suffix),
        driver_inodes=column("driver_inodes"),
        driver_bytes=column("driver_bytes"),
    )


def _prediction(record: Mapping[str, Any] | None) -> Prediction | None:
    if not record:
        return None
    return Prediction(
        clones=record.get("predicted_clones"),
        first_exhausted=record.get("predicted_first_exhausted"),
        inodes_per_clone=record.get("inodes_per_clone"),
        bytes_per_clone=record.get("bytes_per_clone"),
    )


def _footprint(record: Mapping[str, Any]) -> Footprint:
    run = record.get("scenario")
    scenario = None
    if run:
        scenario = Scenario(
            disk_size=int(run["disk_size"]),
            clones=int(run["clones"]),
            bound=int(run.get("bound") or 0),
            first_exhausted=str(run["first_exhausted"]),
            bytes_free_at_end=(run.get("at_end") or {}).get("bytes_free"),
            predicted=_prediction(run.get("predicted")),
        )
    return Footprint(
        layer=_cost(record.get("layer"), ""),
        clone=_cost(record.get("clone"), "_mounted"),
        bench_disk=_prediction(record.get("bench_disk")),
        scenario=scenario,
        definitions=dict(record["definitions"]),
    )


# -- minifs bench --cli -------------------------------------------------------------


@dataclass(frozen=True)
class TimedCommand:
    """One whole command of `minifs bench --cli` (or a peer's), one sample per
    round: the wall time of its processes, in ms."""

    label: str
    """The command as a user types it."""
    samples: Series
    steps: tuple[Series, ...]
    """Each step's own samples (clone, then rm) where the command has several."""


@dataclass(frozen=True)
class CliComparison:
    """A minifs command against a peer, recomputed from the raw samples."""

    minifs: str
    peer: str
    target: float | None
    """The most the ratio of medians may be; None: shown for information."""
    ratio: float | None
    """Median of minifs's samples over the peer's; None if either was not timed."""
    paired: float | None
    """Median of the per-round ratios (the two ran in the same round)."""
    reason: str | None
    """Why it was not measured, when it was not."""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio <= self.target


@dataclass(frozen=True)
class CliTiming:
    """One `minifs bench --cli` run."""

    path: Path
    started_at: str
    wall_seconds: float | None
    partial: bool
    errors: tuple[str, ...]
    rounds: int | None
    warmup_rounds: int | None
    order: str | None
    clock: str | None
    machine: Machine
    load_average_end: tuple[float, ...]
    git_commit: str | None
    git_dirty: bool
    versions: dict[str, str]
    """The peers' and tools' own version lines."""
    skipped: dict[str, str]
    """Command key -> why it was left out (its peer is not installed here)."""
    commands: dict[str, TimedCommand]
    """Commands with at least one sample, in the order the file lists them."""
    comparisons: tuple[CliComparison, ...]

    def name(self, key: str) -> str:
        """A command's label, or its key when it was never timed."""
        command = self.commands.get(key)
        return command.label if command else key


def parse_cli(doc: Mapping[str, Any], path: Path) -> CliTiming:
    """The typed form of a `minifs bench --cli` document."""
    return _guarded(_cli, doc, path, "minifs bench --cli")


def _cli(doc: Mapping[str, Any], path: Path) -> CliTiming:
    settings = doc.get("settings") or {}
    machine = doc.get("machine") or {}
    source = doc.get("source") or {}
    commands = {}
    for key, entry in doc["commands"].items():
        samples = Series.of(entry.get("samples_ms"))
        if samples is None:
            continue  # interrupted before its first round
        per_round = entry.get("steps_ms") or []
        steps = [Series.of(step) for step in zip(*per_round, strict=False)]
        commands[key] = TimedCommand(
            label=str(entry.get("label") or key),
            samples=samples,
            steps=tuple(s for s in steps if s is not None) if len(steps) > 1 else (),
        )
    skipped = {str(k): str(v) for k, v in (doc.get("skipped") or {}).items()}
    return CliTiming(
        path=path,
        started_at=str(doc.get("started_at") or ""),
        wall_seconds=doc.get("wall_seconds"),
        partial=bool(doc.get("partial")),
        errors=tuple(doc.get("errors") or ()),
        rounds=settings.get("rounds"),
        warmup_rounds=settings.get("warmup_rounds"),
        order=settings.get("order"),
        clock=settings.get("clock"),
        machine=_machine(machine),
        load_average_end=tuple(machine.get("load_average_end") or ()),
        git_commit=source.get("git_commit"),
        git_dirty=bool(source.get("git_dirty")),
        versions={
            str(k): str(v) for k, v in ((doc.get("peers") or {}).get("versions") or {}).items()
        },
        skipped=skipped,
        commands=commands,
        comparisons=tuple(
            _comparison(row, commands, skipped) for row in doc.get("comparisons", ())
        ),
    )


def _comparison(
    row: Mapping[str, Any], commands: Mapping[str, TimedCommand], skipped: Mapping[str, str]
) -> CliComparison:
    mine, theirs = commands.get(row["minifs"]), commands.get(row["peer"])
    target = None if row.get("target") is None else float(row["target"])
    if mine is None or theirs is None:
        reason = (
            row.get("reason")
            or skipped.get(row["peer"])
            or skipped.get(row["minifs"])
            or "the run stopped before it was timed"
        )
        return CliComparison(row["minifs"], row["peer"], target, None, None, str(reason))
    paired = [a / b for a, b in zip(mine.samples.samples, theirs.samples.samples, strict=False)]
    return CliComparison(
        minifs=row["minifs"],
        peer=row["peer"],
        target=target,
        ratio=median_ratio(mine.samples, theirs.samples),
        paired=percentile(paired, 50),
        reason=None,
    )
