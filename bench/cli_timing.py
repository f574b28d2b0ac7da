"""`minifs bench --cli`: how long whole minifs commands take beside their peers.

A user waits for a process, not for a function, so each sample is the wall
time of whole processes, from before fork to after wait, taken the same way
for minifs and its peers: `minifs run --rm busybox true` beside `runc run` and
a bare `unshare`; `minifs clone` + `minifs rm` beside `ctr snapshots
prepare` + `rm` and `docker create` + `rm`; `minifs ls --json` and `minifs
--help` beside `python -c pass`, the start-up every Python command pays (the
interpreter of minifs's own script). Samples are paired and interleaved: each
round runs every command once, in an order rotated by one each round, so a
slow moment of this shared machine lands on all of them instead of on one.
One untimed round first warms the page cache and the bytecode. The peers are
private (minifs_bench.peers) and minifs works in a state dir of its own; all
of it lives in the run dir and goes with it.

Results: versioned JSON (schema `minifs-bench-cli`, version 1) with every
raw sample, in results/cli-<timestamp>.json unless --out says otherwise:
  schema, schema_version, partial, interrupted, errors, command, started_at,
  finished_at, wall_seconds, source, machine (+ load_average_end), settings
  {rounds, warmup_rounds, order, clock, env, out}, peers {versions},
  skipped {command key: reason}, rounds [[command key, in the order run]],
  commands {key: {label, argv [[step argv]], samples_ms [per round],
  steps_ms [[per step] per round], summary {n, median, p95, min, max, mean}}},
  comparisons [{minifs, peer, target, ratio_of_medians, paired_ratio_median,
  met, reason}].
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from minifs.errors import (
    BackendError,
    InvalidArgument,
    MinifsError,
    MissingPrerequisite,
    NotSupported,
)
from minifs.state import resolve_root
from minifs_bench import peers, results
from minifs_bench.disk import claim, release, sweep_stale
from minifs_bench.machine import machine_info, source_info
from minifs_bench.options import DEFAULT_LAYERS, METRICS
from minifs_bench.request import RUNS_CAP, _check_out
from minifs_bench.runner import sigint_deferred
from minifs_bench.stats import percentile, ratio, summarize

SCHEMA = "minifs-bench-cli"
SCHEMA_VERSION = 1
WARMUP_ROUNDS = 1
CLOCK = "time.perf_counter from before fork to after wait of each process, summed over steps"


class Timed(NamedTuple):
    """One command of a round: the steps (argvs) run one after the other."""

    key: str
    label: str
    """The command as a user types it."""
    steps: tuple[tuple[str, ...], ...]


class Comparison(NamedTuple):
    """minifs command `minifs` against peer `peer`; `target` is the most the
    ratio of their medians may be (None: shown for information only)."""

    minifs: str
    peer: str
    target: float | None


COMPARISONS = (
    Comparison("minifs_run", "runc_run", 2.0),
    Comparison("minifs_run", "unshare", None),
    Comparison("minifs_clone_rm", "docker_create_rm", 2.0),
    Comparison("minifs_clone_rm", "ctr_prepare_rm", None),
    Comparison("minifs_ls_json", "python_pass", 2.0),
    Comparison("minifs_help", "python_pass", None),
)

NAMES = {
    "minifs_run": "minifs run",
    "runc_run": "runc run",
    "unshare": "unshare",
    "minifs_clone_rm": "minifs clone+rm",
    "docker_create_rm": "docker create+rm",
    "ctr_prepare_rm": "ctr prepare+rm",
    "minifs_ls_json": "minifs ls --json",
    "minifs_help": "minifs --help",
    "python_pass": "python -c pass",
}
"""Every command's key and its short name, for the ratios; the table's order."""

NEEDS = {"runc_run": "runc", "ctr_prepare_rm": "containerd", "docker_create_rm": "docker"}
"""Which peer (minifs_bench.peers) a command needs, to name why it was left out."""


class Settings(NamedTuple):
    rounds: int
    root: Path
    out: Path | None
    minifs: str
    interpreter: list[str]


def validate(args: argparse.Namespace) -> Settings:
    """Every check that can fail before any work; raises a one-line MinifsError."""
    if not 1 <= args.runs <= RUNS_CAP:
        raise InvalidArgument(f"--runs {args.runs}: pick 1..{RUNS_CAP} rounds")
    for flag, value, default in (
        ("--driver", args.driver, "overlay2"),
        ("--layers", args.layers, DEFAULT_LAYERS),
        ("--metrics", args.metrics, ",".join(METRICS)),
        ("--disk-size", args.disk_size, "auto"),
    ):
        if value != default:
            raise InvalidArgument(
                f"{flag} does not apply to --cli, which times whole commands as a user "
                f"types them (on minifs's default driver); drop {flag}"
            )
    if os.geteuid() != 0:
        raise NotSupported(
            "minifs bench --cli runs containers and private daemons, which needs root; "
            "run it as root"
        )
    minifs = Path(sys.executable).with_name("minifs")
    if not minifs.is_file():
        raise MissingPrerequisite(f"{minifs} is missing; run 'make setup'")
    out = Path(args.out).absolute() if args.out else None
    _check_out(out)
    return Settings(args.runs, resolve_root(args.root), out, str(minifs), _interpreter(minifs))


def _interpreter(script: Path) -> list[str]:
    """The interpreter line of the minifs script, as argv: the floor every
    minifs command pays is this interpreter's own start."""
    with open(script, "rb") as f:
        first = f.readline().decode(errors="replace")
    if not first.startswith("#!"):
        raise MissingPrerequisite(f"{script} has no interpreter line; run 'make setup'")
    return first[2:].split()


def commands(settings: Settings, found: peers.Peers) -> list[Timed]:
    """The commands of one round, minifs's own first; a peer left out is absent."""
    minifs = settings.minifs
    bare = "unshare --fork --pid --mount --uts --ipc --net --cgroup true"
    timed = [
        Timed(
            "minifs_run",
            "minifs run --rm busybox true",
            ((minifs, "run", "--rm", "busybox", "true"),),
        ),
        Timed("unshare", bare, (tuple(bare.split()),)),
        Timed(
            "minifs_clone_rm",
            "minifs clone X --from busybox; minifs rm X",
            ((minifs, "clone", "bench-x", "--from", "busybox"), (minifs, "rm", "bench-x")),
        ),
        Timed("minifs_ls_json", "minifs ls --json", ((minifs, "ls", "--json"),)),
        Timed("minifs_help", "minifs --help", ((minifs, "--help"),)),
        Timed(
            "python_pass",
            "python -c pass (minifs's interpreter)",
            ((*settings.interpreter, "-c", "pass"),),
        ),
    ]
    if found.runc is not None:
        timed.append(Timed("runc_run", "runc run (bundle running true)", (tuple(found.runc),)))
    if found.ctr is not None:
        ctr = tuple(found.ctr)
        timed.append(
            Timed(
                "ctr_prepare_rm",
                f"ctr snapshots prepare X {peers.CTR_PARENT}; ctr snapshots rm X",
                (
                    (*ctr, "snapshots", "prepare", "bench-x", peers.CTR_PARENT),
                    (*ctr, "snapshots", "rm", "bench-x"),
                ),
            )
        )
    if found.docker is not None:
        docker = tuple(found.docker)
        timed.append(
            Timed(
                "docker_create_rm",
                "docker create --name X IMAGE true; docker rm X",
                (
                    (*docker, "create", "--name", "bench-x", peers.DOCKER_IMAGE, "true"),
                    (*docker, "rm", "bench-x"),
                ),
            )
        )
    return timed


def wall_time(argv: Sequence[str], env: dict[str, str]) -> float:
    """Seconds the process `argv` took, from before its fork to after its
    wait; a failure is an error naming the command and what it said."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
    except FileNotFoundError:
        raise MissingPrerequisite(f"{argv[0]} is not installed") from None
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise BackendError(
            f"{' '.join(argv)} failed (exit {done.returncode})" + (f": {said[-1]}" if said else "")
        )
    return elapsed


def run_rounds(timed: list[Timed], rounds: int, env: dict[str, str], doc: dict) -> None:
    """Warm-up, then `rounds` rounds of every command in rotating order,
    recording into `doc` as it goes (an interrupted run keeps what it has)."""
    entries = doc["commands"]
    for t in timed:
        entries[t.key] = {
            "label": t.label,
            "argv": [list(step) for step in t.steps],
            "samples_ms": [],
            "steps_ms": [],
        }
    for index in range(-WARMUP_ROUNDS, rounds):
        shift = index % len(timed)
        order = timed[shift:] + timed[:shift]
        if index >= 0:
            doc["rounds"].append([t.key for t in order])
            _progress(f"round {index + 1}/{rounds}")
        for t in order:
            steps = [wall_time(step, env) * 1000 for step in t.steps]
            if index >= 0:
                entries[t.key]["steps_ms"].append(steps)
                entries[t.key]["samples_ms"].append(sum(steps))


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"\r{text} ", end="", file=sys.stderr, flush=True)


def compare(doc: dict) -> None:
    """Summaries of every command, and each comparison's ratios and verdict."""
    entries = doc["commands"]
    for entry in entries.values():
        entry["summary"] = summarize(entry["samples_ms"])
    doc["comparisons"] = []
    for c in COMPARISONS:
        row: dict[str, object] = {
            "minifs": c.minifs,
            "peer": c.peer,
            "target": c.target,
            "ratio_of_medians": None,
            "paired_ratio_median": None,
            "met": None,
            "reason": doc["skipped"].get(c.peer) or doc["skipped"].get(c.minifs),
        }
        mine, theirs = entries.get(c.minifs), entries.get(c.peer)
        if mine and theirs and mine["samples_ms"] and theirs["samples_ms"]:
            row["ratio_of_medians"] = ratio(mine["summary"]["median"], theirs["summary"]["median"])
            paired = [a / b for a, b in zip(mine["samples_ms"], theirs["samples_ms"], strict=False)]
            row["paired_ratio_median"] = percentile(paired, 50)
            if c.target is not None and row["ratio_of_medians"] is not None:
                row["met"] = row["ratio_of_medians"] <= c.target
        elif row["reason"] is None:
            row["reason"] = "the run stopped before it was timed"
        doc["comparisons"].append(row)


def print_summary(doc: dict) -> None:
    """The table of medians (min..max) and the comparisons with their verdicts."""
    timed = [doc["commands"][k] for k in NAMES if doc["commands"].get(k, {}).get("samples_ms")]
    width = max((len(e["label"]) for e in timed), default=0)
    if timed:
        print(f"{'command':<{width}}  {'median ms':>9}  {'min':>7}  {'max':>7}  {'n':>3}")
    for entry in timed:
        s = entry["summary"]
        print(
            f"{entry['label']:<{width}}  {s['median']:9.1f}  {s['min']:7.1f}  "
            f"{s['max']:7.1f}  {s['n']:3d}"
        )
    for key, reason in doc["skipped"].items():
        print(f"{key}: left out: {reason}")
    print()
    for row in doc["comparisons"]:
        name = f"{NAMES[row['minifs']]} / {NAMES[row['peer']]}"
        if row["ratio_of_medians"] is None:
            print(f"{name}: not measured: {row['reason']}")
            continue
        line = f"{name}: {row['ratio_of_medians']:.2f}x (paired {row['paired_ratio_median']:.2f}x)"
        if row["target"] is not None:
            verdict = "met" if row["met"] else "NOT met"
            line += f"; target <= {row['target']:.1f}x: {verdict}"
        print(line)


def new_document(settings: Settings, env: dict[str, str], workdir: Path) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "partial": False,
        "interrupted": False,
        "errors": [],
        "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished_at": None,
        "wall_seconds": None,
        "source": source_info(),
        "machine": machine_info(workdir.parent),
        "settings": {
            "rounds": settings.rounds,
            "warmup_rounds": WARMUP_ROUNDS,
            "order": "rotating: round r runs the commands shifted by r",
            "clock": CLOCK,
            "env": env,
            "out": None,
        },
        "peers": {"versions": {}},
        "skipped": {},
        "rounds": [],
        "commands": {},
        "comparisons": [],
    }


def main(args: argparse.Namespace) -> int:
    settings = validate(args)
    started = time.time()
    bench_root = settings.root / "bench"
    sweep_stale(bench_root)
    workdir = bench_root / f"cli-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    out = settings.out or results.default_path("cli", started).absolute()
    state = workdir / "minifs" / "state"
    env_extra = {"MINIFS_ROOT": str(state)}
    doc = new_document(settings, env_extra, workdir)
    doc["settings"]["out"] = str(out)
    clock = time.perf_counter()
    claim(workdir)
    try:
        print("setting up minifs's state dir and the private peers ...", file=sys.stderr)
        found = peers.set_up(workdir, [settings.minifs, "--root", str(state)])
        doc["peers"]["versions"] = {
            **found.versions,
            "unshare": peers.version(["unshare", "--version"]),
            "python": peers.version([*settings.interpreter, "--version"]),
        }
        doc["skipped"] = {
            key: f"{peer}: {found.skipped[peer]}"
            for key, peer in NEEDS.items()
            if peer in found.skipped
        }
        timed = commands(settings, found)
        run_rounds(timed, settings.rounds, {**os.environ, **env_extra}, doc)
        _progress("")
    except KeyboardInterrupt:
        doc["interrupted"] = True
    except MinifsError as exc:
        doc["errors"].append(str(exc))
    finally:
        with sigint_deferred():
            release(workdir)
            doc["machine"]["load_average_end"] = os.getloadavg()
            doc["partial"] = doc["interrupted"] or bool(doc["errors"])
            compare(doc)
            doc["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            doc["wall_seconds"] = time.perf_counter() - clock
            results.save(doc, out)
    print_summary(doc)
    print(f"results: {out}")
    if doc["interrupted"]:
        print(f"interrupted: partial results saved to {out}", file=sys.stderr)
        raise KeyboardInterrupt
    for error in doc["errors"]:
        print(f"minifs: error: {error}", file=sys.stderr)
    return 1 if doc["errors"] else 0
