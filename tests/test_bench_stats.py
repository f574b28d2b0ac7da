"""The bench's pure computations on known inputs: summaries, sweeps, the
results file's schema, and the disk-size estimate behind the 'too small' error."""

from __future__ import annotations

import json

import pytest

from minifs.plugins import registered
from minifs_bench import amplification, results
from minifs_bench.request import needed_disk
from minifs_bench.stats import depth_sweep, percentile, ratio, summarize


def test_percentile_interpolates_between_ranks():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 5.0
    assert percentile(samples, 95) == pytest.approx(4.8)
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([7.0], 95) == 7.0


def test_percentile_rejects_nonsense():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_known_samples():
    summary = summarize([10.0, 20.0, 30.0, 40.0])
    assert summary == {
        "n": 4,
        "median": 25.0,
        "p95": pytest.approx(38.5),
        "min": 10.0,
        "max": 40.0,
        "mean": 25.0,
    }
    assert summarize([]) == {"n": 0}


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None


@pytest.mark.parametrize(
    ("layers", "depths"),
    [
        (1, [1]),
        (2, [1, 2]),
        (3, [1, 2, 3]),
        (50, [1, 2, 4, 8, 16, 32, 50]),
        (64, [1, 2, 4, 8, 16, 32, 64]),
        (500, [1, 2, 4, 8, 16, 32, 64, 128, 256, 500]),
    ],
)
def test_depth_sweep_includes_one_and_the_deepest(layers, depths):
    assert depth_sweep(layers) == depths


def test_depth_sweep_needs_a_layer():
    with pytest.raises(ValueError):
        depth_sweep(0)


def test_update_sizes_span_4k_to_64m():
    sizes = amplification.UPDATE_SIZES
    assert sizes[0] == 4096
    assert sizes[-1] == 64 << 20
    assert sizes == sorted(sizes)


def test_results_round_trip_and_schema_checks(tmp_path):
    doc = results.new_document({"layers": 3}, {"kernel": "x"}, {}, ["minifs", "bench"])
    results.finish(doc, 1.5)
    path = tmp_path / "r.json"
    results.save(doc, path)
    loaded = results.load(path)
    assert loaded["schema"] == results.SCHEMA
    assert loaded["schema_version"] == results.SCHEMA_VERSION
    assert loaded["wall_seconds"] == 1.5
    assert not list(tmp_path.glob(".*.tmp"))

    path.write_text(json.dumps({**doc, "schema_version": results.SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match="upgrade"):
        results.load(path)
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not a minifs bench result"):
        results.load(path)


def test_copying_driver_needs_more_disk_than_cow():
    """vfs pays a full image per layer, so 500 layers outgrow the 2 GiB default
    (by inodes on ext4); overlay2 at 50 layers fits easily."""
    drivers = registered()
    metrics = ["latency", "amplification", "lookup", "footprint"]
    assert needed_disk(drivers["overlay2"], 50, 5, metrics) < 1 << 30
    assert needed_disk(drivers["vfs"], 500, 5, metrics) > 2 << 30
    assert needed_disk(drivers["vfs"], 50, 5, metrics) > needed_disk(
        drivers["overlay2"], 50, 5, metrics
    )
