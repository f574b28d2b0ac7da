"""`minifs report` from the committed reference results: its PNGs, its HTML
page and its findings, which must follow the data (change a sample, the
sentence changes); bad files refused one line each while the rest are still
reported; runs on another kernel labelled; matplotlib only when it runs.
`minifs bench --cli` files are reported beside bench results, in a section
of their own."""

from __future__ import annotations

import copy
import html
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from minifs.output import human_size
from minifs.report.findings import CONFIRMS, CONTRADICTS, MET, NOT_MET, Finding, findings
from minifs.report.runs import entries, load, timed_runs
from minifs_bench import cli_timing, results
from tests.conftest import MINIFS, refused

RESULTS = Path(__file__).resolve().parent.parent / "results"
PNG = b"\x89PNG\r\n\x1a\n"


def _committed() -> list[Path]:
    files = sorted(RESULTS.glob("*.json"))
    assert files, "results/ holds no reference run"
    return files


def _reference() -> Path:
    """The committed bench run with the most drivers."""
    runs = {p: results.read(p) for p in _committed()}
    bench = {p: r for p, r in runs.items() if isinstance(r, results.BenchResult)}
    assert bench, "results/ holds no bench run"
    return max(bench, key=lambda p: len(bench[p].drivers))


def _cli_reference() -> Path:
    """The newest committed `minifs bench --cli` run."""
    cli = [p for p in _committed() if isinstance(results.read(p), results.CliTiming)]
    assert cli, "results/ holds no 'minifs bench --cli' run"
    return max(cli, key=lambda p: results.read(p).started_at)


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MINIFS, "report", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _write(tmp_path: Path, name: str, doc: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_report_of_the_committed_results(tmp_path):
    out = tmp_path / "report"
    done = _report(*map(str, _committed()), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    pngs = {p.name for p in out.glob("*.png")}
    assert {"latency.png", "amplification.png", "lookup.png", "footprint.png", "clones.png"} <= pngs
    for png in out.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG), png
        width = int.from_bytes(data[16:20], "big")
        assert width >= 1000, f"{png.name} is {width} px wide"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs), "every plot embedded"
    assert "http://" not in page and "https://" not in page, "self-contained: fetches nothing"
    result = results.read(_reference())
    for driver in result.drivers.values():
        assert driver.label in page, driver.label
        assert driver.label in (out / "report.html").read_text()
    assert result.machine.kernel in page
    latency = next(d.latency for d in result.drivers.values() if d.latency)
    assert latency.definitions["create"] in page.replace("&#x27;", "'"), "definitions shown"
    # The terminal names every file written and states the findings.
    assert f"wrote {out / 'report.html'}" in done.stdout
    for finding in findings(result)[:3]:
        assert finding.text[:60] in " ".join(done.stdout.split()), finding.text


def _twice(found: list[Finding], driver: str) -> list[Finding]:
    """The findings on the seed's "CoW writes twice" about `driver`."""
    return [f for f in found if "writes twice" in f.text and f"{driver} (CoW)" in f.text]


def test_findings_follow_the_data():
    """Scale the samples of the largest 4-byte update and of random writes:
    the sentences must carry the new figures and flip their verdicts."""
    doc = results.load(_reference())
    name = next(
        n
        for n, e in doc["drivers"].items()
        if e["driver"]["kind"] == "cow" and "amplification" in e["metrics"]
    )
    before = {f.text for f in findings(results.parse(doc, Path("before.json")))}
    changed = copy.deepcopy(doc)
    workloads = changed["drivers"][name]["metrics"]["amplification"]["workloads"]
    biggest = max(
        (w for w in workloads if w["workload"] == "update-4b"), key=lambda w: w["file_size"]
    )
    random = next(w for w in workloads if w["workload"] == "random-4k")
    for sample in biggest["samples"]:
        sample["device_bytes_net"] = sample["device_bytes"] = 123 * 4096
    for sample in random["samples"]:
        sample["device_bytes_net"] = sample["device_bytes"] = 2 * random["logical_bytes"]
    after = findings(results.parse(changed, Path("after.json")))
    texts = [f.text for f in after]
    assert any(f"{name} wrote {human_size(123 * 4096)}" in t for t in texts), texts
    twice = _twice(after, name)
    assert twice and twice[0].verdict == CONFIRMS, twice
    assert "2.0x: about twice" in twice[0].text
    assert {f.text for f in after} != before
    for sample in random["samples"]:
        sample["device_bytes_net"] = sample["device_bytes"] = 5 * random["logical_bytes"]
    again = findings(results.parse(changed, Path("again.json")))
    twice = _twice(again, name)
    assert twice[0].verdict == CONTRADICTS and "5.0x" in twice[0].text


def _only(doc: dict, metric: str) -> dict:
    doc = copy.deepcopy(doc)
    for entry in doc["drivers"].values():
        entry["metrics"] = {metric: entry["metrics"][metric]}
    return doc


def test_bad_files_are_refused_by_name_and_the_rest_reported(tmp_path):
    good = _reference()
    doc = results.load(good)
    bad = {
        "garbage.json": "not json {",
        "other.json": {"schema": "something-else"},
        "future.json": {**doc, "schema_version": results.SCHEMA_VERSION + 1},
        "ancient.json": {**doc, "schema_version": 0},
        "lookup-only.json": _only(doc, "lookup"),
    }
    paths = [_write(tmp_path, n, d) for n, d in bad.items()]
    first = _write(tmp_path, "latency-only.json", _only(doc, "latency"))
    out = tmp_path / "out"
    done = _report(str(first), *map(str, paths), str(good), "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == len(bad), lines
    for line, path in zip(lines, paths, strict=True):
        assert line.startswith("minifs: error: ") and str(path) in line, line
    assert "upgrade minifs" in lines[2]
    assert "unknown schema version 0" in lines[3]
    assert "shares no metric" in lines[4]
    # The files that could be read are still reported, side by side.
    page = (out / "report.html").read_text()
    assert "latency-only.json" in page and good.name in page
    assert "Files left out" in page and "garbage.json" in page


def test_nothing_reportable_creates_nothing(tmp_path):
    out = tmp_path / "out"
    junk = _write(tmp_path, "junk.json", [1, 2])
    refused(_report(str(junk), "--out", str(out)), str(junk), "not a minifs bench result")
    assert not out.exists()
    missing = tmp_path / "missing.json"
    done = _report(str(missing), str(junk), "--out", str(out))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and str(missing) in lines[0] and str(junk) in lines[1], lines
    assert not out.exists()
    assert not out.exists()
    a_file = _write(tmp_path, "file", "x")
    refused(_report(str(_reference()), "--out", str(a_file)), str(a_file), "not a directory")
    refused(_report("--out", str(out)), "missing FILE")


def test_runs_on_another_kernel_are_labelled(tmp_path):
    doc = results.load(_reference())
    other = copy.deepcopy(doc)
    other["machine"]["kernel"] = "9.9.9-elsewhere"
    other["started_at"] = "2030-01-02T03:04:05+0000"
    paths = [_write(tmp_path, "a.json", doc), _write(tmp_path, "b.json", other)]
    series = entries(load(paths).results)
    assert len(series) == 2 * len(doc["drivers"])
    moved = [e for e in series if e.result.path.name == "b.json"]
    assert all("[kernel 9.9.9-elsewhere]" in e.label for e in moved)
    assert all("2030-01-02 03:04" in e.label for e in moved), "same driver twice: runs named"
    assert not any("[kernel" in e.label for e in series if e.result.path.name == "a.json")
    assert len({e.label for e in series}) == len(series)


def test_matplotlib_is_imported_only_by_report():
    probe = (
        "import sys\n"
        "from minifs.cli import main\n"
        "for argv in (['--help'], ['report', '--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('matplotlib' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("path", _committed(), ids=lambda p: p.name)
def test_every_committed_result_reads(path):
    result = results.read(path)
    if isinstance(result, results.CliTiming):
        assert result.commands and result.comparisons
    else:
        assert result.drivers and result.metrics()


def test_the_cli_writer_and_the_reader_agree_on_the_schema():
    assert (cli_timing.SCHEMA, cli_timing.SCHEMA_VERSION) == (
        results.CLI_SCHEMA,
        results.CLI_SCHEMA_VERSION,
    )
    assert results.CLI_SCHEMA_VERSION in results.CLI_KNOWN_VERSIONS


def test_a_cli_timing_file_is_reported(tmp_path):
    path = _cli_reference()
    doc = json.loads(path.read_text())
    out = tmp_path / "out"
    done = _report(str(path), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert {p.name for p in out.glob("*.png")} == {"cli.png"}, "no storage plot without data"
    data = (out / "cli.png").read_bytes()
    assert data.startswith(PNG) and int.from_bytes(data[16:20], "big") >= 1000
    page = html.unescape((out / "report.html").read_text())
    assert 'src="data:image/png;base64,' in page and "Storage drivers" not in page
    assert f"From {path.name}, written by minifs bench --cli" in page.replace("<code>", "").replace(
        "</code>", ""
    )
    text = " ".join(done.stdout.split())
    for key, entry in doc["commands"].items():
        samples = entry["samples_ms"]
        median = statistics.median(samples)  # recomputed from the raw samples
        row = f"{median:.1f} {min(samples):.1f}-{max(samples):.1f} {len(samples)}"
        assert row in text, (key, row)
        assert entry["label"] in page and f"{median:.1f}" in page, key
    for row in doc["comparisons"]:
        if row["target"] is not None and row["ratio_of_medians"] is not None:
            verdict = "met" if row["ratio_of_medians"] <= row["target"] else "NOT met"
            assert f"{row['ratio_of_medians']:.2f}x ≤ {row['target']:.1f}x {verdict}" in text
    for finding in findings(results.read(path)):
        assert finding.text[:60] in text, finding.text
        assert finding.text in page


def _ratio_finding(found: list[Finding], label: str) -> Finding:
    return next(f for f in found if f.text.startswith(f"'{label}' took") and "target" in f.text)


def test_cli_findings_follow_the_data(tmp_path):
    """Make minifs run faster in a copy: the ratio, its figures and the
    verdict change with it; both runs reported side by side, labelled."""
    path = _cli_reference()
    doc = json.loads(path.read_text())
    row = next(c for c in doc["comparisons"] if c["target"] and c["ratio_of_medians"])
    mine, peer = doc["commands"][row["minifs"]], doc["commands"][row["peer"]]
    peer_median = statistics.median(peer["samples_ms"])
    before = _ratio_finding(findings(results.read(path)), mine["label"])
    ratio = statistics.median(mine["samples_ms"]) / peer_median
    assert f"took {ratio:.2f}x" in before.text
    assert before.verdict == (MET if ratio <= row["target"] else NOT_MET)

    changed = copy.deepcopy(doc)
    changed["started_at"] = "2030-01-02T03:04:05+0000"
    changed["machine"]["kernel"] = "9.9.9-elsewhere"
    fast = 0.5 * row["target"] * peer_median  # half what the target allows: met
    changed["commands"][row["minifs"]]["samples_ms"] = [fast] * len(mine["samples_ms"])
    copied = _write(tmp_path, "faster.json", changed)
    after = _ratio_finding(findings(results.read(copied)), mine["label"])
    assert after.verdict == MET
    assert f"took {0.5 * row['target']:.2f}x" in after.text and "met)." in after.text
    assert after.text != before.text
    slow = 3 * row["target"] * peer_median
    changed["commands"][row["minifs"]]["samples_ms"] = [slow] * len(mine["samples_ms"])
    slower = _ratio_finding(
        findings(results.read(_write(tmp_path, "s.json", changed))), mine["label"]
    )
    assert slower.verdict == NOT_MET and f"took {3 * row['target']:.2f}x" in slower.text

    runs = timed_runs(load([path, copied]).timings)
    assert len(runs) == 2 and runs[0].label != runs[1].label
    assert "[kernel 9.9.9-elsewhere]" in runs[1].label and "2030-01-02 03:04" in runs[1].label
    assert "[kernel" not in runs[0].label
    out = tmp_path / "out"
    done = _report(str(path), str(copied), "--out", str(out))
    assert done.returncode == 0, done.stderr
    page = html.unescape((out / "report.html").read_text())
    assert before.text in page and after.text in page
    assert runs[1].label in page and path.name in page and "faster.json" in page


def test_bad_cli_file_refused_and_bench_and_cli_reported_together(tmp_path):
    """A CLI file of an unknown version or damaged is one line; a CLI file
    beside a bench file holding one metric is not refused for sharing none."""
    doc = json.loads(_cli_reference().read_text())
    bad = {
        "cli-future.json": {**doc, "schema_version": results.CLI_SCHEMA_VERSION + 1},
        "cli-ancient.json": {**doc, "schema_version": 0},
        "cli-damaged.json": {**doc, "commands": [1, 2]},
        "cli-empty.json": {**doc, "commands": {}},
    }
    paths = [_write(tmp_path, n, d) for n, d in bad.items()]
    bench = _write(tmp_path, "latency-only.json", _only(results.load(_reference()), "latency"))
    cli = _write(tmp_path, "cli.json", doc)
    out = tmp_path / "out"
    done = _report(str(bench), *map(str, paths), str(cli), "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == len(bad), lines
    for line, path in zip(lines, paths, strict=True):
        assert line.startswith("minifs: error: ") and str(path) in line, line
    assert "minifs-bench-cli schema version 2" in lines[0] and "upgrade minifs" in lines[0]
    assert "unknown schema version 0" in lines[1]
    assert "damaged" in lines[2] and "minifs bench --cli" in lines[2]
    assert "no timed command" in lines[3]
    assert {p.name for p in out.glob("*.png")} == {"latency.png", "cli.png"}
    page = html.unescape((out / "report.html").read_text())
    assert "Storage drivers" in page and "Command-line timing" in page
    assert "From latency-only.json, written by minifs bench." in page.replace("<code>", "").replace(
        "</code>", ""
    )
    assert "Files left out" in page and "cli-future.json" in page


@pytest.mark.parametrize(
    ("backend", "label"),
    [
        ("zfs/zpool commands (zfs-fuse)", "zfs (zfs-fuse)"),
        ("kernel overlayfs", "zfs (kernel overlayfs)"),
        ("", "zfs (unknown backend)"),
        ("thin pool over FUSE; kernel dm-thin unavailable (userspace)", "zfs (userspace)"),
        # A remark with parentheses of its own, as devicemapper results before 2026-12-07 carry.
        ("userspace thin pool over FUSE (kernel dm-thin unavailable: no dm-thin (x))",
         "zfs (userspace thin pool over FUSE)"),
    ],
)  # fmt: skip
def test_legend_label_takes_the_backends_short_form(backend, label):
    run = results.DriverRun(
        name="zfs", kind="cow", backend=backend, version=None, disk_filesystem=None,
        errors=(), wall_seconds=None, status={},
    )  # fmt: skip
    assert run.label == label
