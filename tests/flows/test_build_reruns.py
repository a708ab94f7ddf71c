"""Reruns equal fresh builds: after deleted shards, a longer `--until`, a changed upstream setting
and a sample the shard stage fails on, a rerun into the same directory writes byte for byte what a
build into an empty directory writes."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client

import refany3d.models.detector as detector_backends
import refany3d.stages.shard as shard_stage
from refany3d.config import BuildSettings, override
from refany3d.flows.build_dataset import build_dataset
from refany3d.models.detector.truth import TruthDetector
from refany3d.records import STAGE_ERROR
from refany3d.stages.mesh import MESH_TIMEOUT
from refany3d.testing.checkpoints import tiny_sam_checkpoint
from tests.flows._runs import rejects, shard_ids, task_runs

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _settings(out: Path, files: str, **dotted) -> BuildSettings:
    base = {
        "source.kind": "synthetic",
        "source.data_files": files,
        "storage.out": str(out),
        "until": "depth",
        "runtime.batch_size": 2,
    }
    return override(BuildSettings(), **{**base, **dotted})


def _output(out: Path) -> dict[str, bytes]:
    """Every shard and reject table of a build, by sub-directory and file name."""
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("[dr]*/*.parquet"))}


def _fresh(tmp_path: Path, settings: BuildSettings) -> dict[str, bytes]:
    out = tmp_path / "fresh"
    build_dataset(override(settings, **{"storage.out": str(out)}))
    return _output(out)


def _states(result: dict) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        return {t.name: t.state.name for t in task_runs(client, result["flow_run_id"], expect=1)}


def test_rerun_after_deleting_shards_rewrites_them_and_nothing_else(tmp_path, synthetic_source):
    out = tmp_path / "out"
    settings = _settings(out, synthetic_source)
    build_dataset(settings)
    written = _output(out)
    for shard in (out / "data").glob("*.parquet"):
        shard.unlink()
    result = build_dataset(settings)
    assert _output(out) == written == _fresh(tmp_path, settings)
    assert len(result["shards"]) == len([k for k in written if k.startswith("data/")]) > 0
    states = _states(result)
    assert {s for n, s in states.items() if n.startswith("shard-")} == {"Completed"}
    assert {s for n, s in states.items() if not n.startswith("shard-")} == {"Cached"}


def test_rerun_with_longer_until_equals_fresh_build(tmp_path, synthetic_source):
    out = tmp_path / "out"
    build_dataset(_settings(out, synthetic_source, until="split"))
    longer = _settings(out, synthetic_source, until="detect")
    build_dataset(longer)
    assert _output(out) == _fresh(tmp_path, longer)
    assert all("box" in pq.read_schema(p).names for p in (out / "data").glob("*.parquet"))


def test_rerun_after_upstream_setting_change_equals_fresh_build(tmp_path, synthetic_source):
    """A changed detector setting must reach the masks of a real (tiny random-weight) SAM and the
    depth below it, through the chained keys: nothing downstream is served from the cache."""
    ckpt = tiny_sam_checkpoint(tmp_path / "sam_tiny.pth")
    sam = {
        "segmenter.backend": "sam",
        "segmenter.weights": str(ckpt),
        "segmenter.max_area_ratio": 1.0,
        "segmenter.min_area_ratio": 0.0,
        "segmenter.max_components": 10000,
    }
    out = tmp_path / "out"
    build_dataset(_settings(out, synthetic_source, **sam))
    before = _output(out)
    changed = _settings(out, synthetic_source, **sam, **{"detector.truth_dilation": 0.3})
    result = build_dataset(changed)
    after = _output(out)
    assert after == _fresh(tmp_path, changed)
    assert set(after).isdisjoint(before)  # every shard name changed with its content
    states = _states(result)
    for stage in ("detect", "segment", "depth", "shard"):
        assert {s for n, s in states.items() if n.startswith(f"{stage}-")} == {"Completed"}, stage
    assert {s for n, s in states.items() if n.startswith(("source-", "quality-", "split-"))} == {"Cached"}


def test_sample_the_shard_stage_fails_on_is_rejected_and_the_others_are_written(
    tmp_path, synthetic_source, monkeypatch
):
    out = tmp_path / "out"
    settings = _settings(out, synthetic_source, until="split")
    build_dataset(settings)
    first = sorted(shard_ids(out))
    victim = first[1]
    real_row = shard_stage.sample_row

    def failing_row(sample, columns, store):
        if sample.sample_id == victim:
            raise ValueError("cannot build this row")
        return real_row(sample, columns, store)

    monkeypatch.setattr(shard_stage, "sample_row", failing_row)
    result = build_dataset(override(settings, **{"storage.shard_size": 2}))
    ids = shard_ids(out)
    assert sorted(ids) == [i for i in first if i != victim] and result["stats"]["shard"]["kept"] == len(ids)
    assert [(r["stage"], r["reason"], r["sample_id"]) for r in rejects(out) if r["stage"] == "shard"] == [
        ("shard", STAGE_ERROR, victim)
    ]
    assert STAGE_ERROR == "stage_error"
    assert _output(out) == _fresh(tmp_path, override(settings, **{"storage.shard_size": 2}))


def test_identical_builds_into_two_directories_write_the_same_names_and_bytes(tmp_path):
    """The synthetic default: each build generates its source under its own OUT/source."""
    names = {}
    for out in (tmp_path / "one", tmp_path / "elsewhere" / "two"):
        settings = override(
            BuildSettings(),
            **{
                "storage.out": str(out),
                "source.synthetic_rows": 2,
                "until": "split",
                "runtime.batch_size": 2,
            },
        )
        build_dataset(settings)
        names[out.name] = _output(out)
    assert names["one"] == names["two"] and names["one"]


def test_rerun_with_another_source_seed_equals_fresh_build(tmp_path, synthetic_source):
    out = tmp_path / "out"
    build_dataset(_settings(out, synthetic_source, until="detect"))
    seeded = _settings(out, synthetic_source, until="detect", **{"source.seed": 7})
    build_dataset(seeded)
    assert _output(out) == _fresh(tmp_path, seeded)


class _DownDetector(TruthDetector):
    """A detector service that times out while `down`, then works (the truth detector's boxes)."""

    down = True

    def detect(self, *args, **kwargs):
        if _DownDetector.down:
            raise TimeoutError("detector service timed out")
        return super().detect(*args, **kwargs)


@pytest.fixture
def down_detector(monkeypatch):
    monkeypatch.setitem(detector_backends.BACKENDS, "truth", _DownDetector)
    detector_backends._load.cache_clear()  # built once per process: build the flaky one
    _DownDetector.down = True
    yield _DownDetector
    detector_backends._load.cache_clear()


def test_transient_stage_error_is_not_cached_and_the_next_run_keeps_the_samples(
    tmp_path, synthetic_source, down_detector
):
    out = tmp_path / "out"
    settings = _settings(out, synthetic_source, until="segment")
    first = build_dataset(settings)
    errors = [r for r in rejects(out) if r["stage"] == "detect"]
    assert errors and {(r["reason"], r["transient"]) for r in errors} == {(STAGE_ERROR, True)}
    assert first["stats"]["detect"]["transient"] == len(errors) == first["stats"]["detect"]["in"]

    down_detector.down = False
    second = build_dataset(settings)
    assert second["stats"]["detect"]["dropped"] == 0 and second["stats"]["segment"]["kept"] > 0
    assert _output(out) == _fresh(tmp_path, settings)
    states = _states(second)
    for stage in ("detect", "segment", "shard"):
        assert {s for n, s in states.items() if n.startswith(f"{stage}-")} == {"Completed"}, stage
    assert {s for n, s in states.items() if n.startswith(("source-", "quality-", "split-"))} == {"Cached"}
    assert set(_states(build_dataset(settings)).values()) == {"Cached"}  # now they are results


def test_mesh_timeouts_are_retried_by_the_next_run_and_keep_the_meshes(tmp_path, synthetic_source):
    out = tmp_path / "out"
    hurried = _settings(out, synthetic_source, until="mesh", **{"mesher.timeout_s": 1e-6})
    first = build_dataset(hurried)
    timeouts = [r for r in rejects(out) if r["stage"] == "mesh"]
    assert {(r["reason"], r["transient"]) for r in timeouts} == {(MESH_TIMEOUT, True)}
    assert MESH_TIMEOUT == "mesh_timeout"
    assert first["stats"]["mesh"]["transient"] == first["stats"]["mesh"]["in"] == len(timeouts)
    assert "transient drop" in (out / "README.md").read_text()

    settings = _settings(out, synthetic_source, until="mesh")
    second = build_dataset(settings)
    assert second["stats"]["mesh"]["kept"] == second["stats"]["mesh"]["in"] > 0
    assert _output(out) == _fresh(tmp_path, settings)
    assert {s for n, s in _states(second).items() if n.startswith("mesh-")} == {"Completed"}
