"""The `build-dataset` flow under a Prefect test harness: shards, rejects, caching, failure policy,
GPU slots, artifacts and the Dask runner."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect import task
from prefect.client.orchestration import get_client
from prefect.task_runners import ThreadPoolTaskRunner

from refany3d.config import BuildSettings, override
from refany3d.flows.artifacts import artifact_key
from refany3d.flows.build_dataset import build_dataset
from refany3d.flows.policy import is_out_of_memory, is_transient, smaller_batch
from refany3d.flows.runtime import ensure_gpu_limit, gpu_limit_name
from refany3d.flows.scheduler import Scheduler
from refany3d.records import IMAGE, STAGE_ERROR, StageResult
from refany3d.stages.dag import STAGES, build_stages
from refany3d.stages.read_source import plan_source
from refany3d.storage.versions import read_version
from tests.flows._runs import artifacts, rejects, shard_bytes, shard_ids, task_runs

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _settings(out: Path, files: str, kind: str = "subjects200k", **dotted) -> BuildSettings:
    base = {
        "source.kind": kind,
        "source.data_files": files,
        "storage.out": str(out),
        "until": "split",
        "runtime.batch_size": 4,
    }
    return override(BuildSettings(), **{**base, **dotted})


def test_build_dataset_until_split_writes_shards_rejects_card_and_artifacts(tmp_path, s200k_source):
    out = tmp_path / "out"
    result = build_dataset(_settings(out, s200k_source, name="Flow Test"))

    ids = shard_ids(out)
    assert len(ids) == 12 and len(set(ids)) == 12  # 6 good rows x 2 views, no duplicates
    assert sorted((r["stage"], r["reason"]) for r in rejects(out)) == [
        ("quality", "low_quality"),
        ("split", "image_undecodable"),
    ]
    stats = result["stats"]
    assert stats["split"]["kept"] == 12 and stats["split"]["dropped_image_undecodable"] == 1
    assert json.loads((out / "stats.json").read_text())["stages"] == stats
    assert (out / "README.md").read_text().startswith("---\n")
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(result["flow_run_id"]).name == "Flow Test"
        runs = task_runs(client, result["flow_run_id"], expect=8)
        names = {t.name for t in runs}
        arts = artifacts(client, result["flow_run_id"])
        # untagged: no `tag:` concurrency slot to take (a server call each) as a task run starts
        assert all(not t.tags for t in runs)
    assert names == {
        f"{s}-batch-pairs-{a:07d}-{b:07d}"
        for s in ("source", "quality", "split", "shard")
        for a, b in ((0, 4), (4, 8))
    }
    keys = {a.key for a in arts}
    assert {"flow-test-yield", "flow-test-progress", "flow-test-gallery", "flow-test-shards"} <= keys
    tables = sorted((a for a in arts if a.key == "flow-test-yield"), key=lambda a: a.created)
    assert len(tables) >= 2  # published as the run progressed, then final
    final = {row["stage"]: row for row in json.loads(tables[-1].data)}
    assert final["split"]["kept"] == 12 and final["split"]["dropped by reason"] == "image_undecodable: 1"
    gallery = next(a for a in arts if a.key == "flow-test-gallery").data
    assert "data:image/jpeg;base64," in gallery
    progress = [a for a in arts if a.key == "flow-test-progress"]
    assert progress and progress[-1].data == 100.0


def test_build_dataset_rerun_reuses_every_task_and_writes_same_shards(tmp_path, s200k_source):
    out = tmp_path / "out"
    settings = _settings(out, s200k_source)
    first = build_dataset(settings)
    before = shard_bytes(out)
    second = build_dataset(settings)
    assert shard_bytes(out) == before and second["stats"] == first["stats"]
    # the same content is the same dataset version (what scheduled retraining skips on)
    assert second["version"] == first["version"] == read_version(str(out)).version
    with get_client(sync_client=True) as client:
        states = {t.name: t.state.name for t in task_runs(client, second["flow_run_id"], expect=8)}
    assert len(states) == 8 and set(states.values()) == {"Cached"}


def test_build_dataset_rejects_the_sample_a_stage_fails_on(tmp_path, synthetic_source):
    out = tmp_path / "out"
    settings = _settings(out, synthetic_source, kind="synthetic")
    build_dataset(settings)
    # Break one view's image in the artifact store: detect raises on it, and only on it.
    broken = sorted((out / "artifacts").rglob("*.png"))

    victim = next(p for p in broken if p.parent.name == IMAGE)
    victim.write_bytes(b"not an image at all")
    result = build_dataset(override(settings, until="detect"))

    errors = [r for r in rejects(out) if r["reason"] == STAGE_ERROR]
    assert STAGE_ERROR == "stage_error"
    assert len(errors) == 1 and errors[0]["stage"] == "detect"
    assert "UnidentifiedImageError" in errors[0]["detail"]
    detect, split = result["stats"]["detect"], result["stats"]["split"]
    assert detect["in"] == split["kept"] and detect["dropped_stage_error"] == 1
    assert detect["kept"] + detect["dropped"] == detect["in"]


def test_gpu_limit_is_per_machine_and_builds_never_resize_it():
    with get_client(sync_client=True) as client:
        assert gpu_limit_name("host-a") != gpu_limit_name("host-b")
        assert ensure_gpu_limit(gpu_limit_name("host-a"), 3) == 3
        assert ensure_gpu_limit(gpu_limit_name("host-b"), 1) == 1  # its own slots
        assert ensure_gpu_limit(gpu_limit_name("host-a"), 2) == 3  # another build: no resize
        assert client.read_global_concurrency_limit_by_name(gpu_limit_name("host-a")).limit == 3
        assert client.read_global_concurrency_limit_by_name(gpu_limit_name("host-b")).limit == 1


def test_cuda_build_takes_and_gives_back_this_machines_gpu_slots(tmp_path, synthetic_source):
    cuda = _settings(tmp_path / "out", synthetic_source, kind="synthetic", until="detect")
    cuda = override(cuda, **{"runtime.device": "cuda", "runtime.gpu_slots": 2})
    with get_client(sync_client=True) as client:
        cpu = build_dataset(override(cuda, **{"runtime.device": "cpu"}))
        assert all(lim.name != gpu_limit_name() for lim in client.read_global_concurrency_limits())
        result = build_dataset(cuda)  # truth detector needs no GPU; the slots are taken all the same
        limit = client.read_global_concurrency_limit_by_name(gpu_limit_name())
        assert all(lim.name != "gpu" for lim in client.read_global_concurrency_limits())
    assert limit.limit == 2 and limit.active_slots == 0
    assert result["stats"]["detect"]["in"] == cpu["stats"]["split"]["kept"] > 0


def test_switch_interval_is_the_builds_setting_and_a_rerun_with_another_is_cached(tmp_path, s200k_source):
    out = tmp_path / "out"
    before = sys.getswitchinterval()
    try:
        first = build_dataset(_settings(out, s200k_source))
        assert sys.getswitchinterval() == pytest.approx(0.005)  # the default: Python's own
        second = build_dataset(_settings(out, s200k_source, **{"runtime.switch_interval_ms": 0.5}))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)
    assert second["version"] == first["version"]  # how threads switch decides no output
    with get_client(sync_client=True) as client:
        states = {t.name: t.state.name for t in task_runs(client, second["flow_run_id"], expect=8)}
    assert set(states.values()) == {"Cached"}


def test_build_dataset_dask_runner_writes_same_shards_as_threads(tmp_path, s200k_source):
    build_dataset(_settings(tmp_path / "threads", s200k_source))
    build_dataset(
        _settings(tmp_path / "dask", s200k_source, **{"runtime.runner": "dask", "runtime.workers": 2})
    )
    assert shard_bytes(tmp_path / "dask") == shard_bytes(tmp_path / "threads")


def test_failure_classification():
    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError())
    assert is_transient(OSError(5, "Input/output error"))
    assert not is_transient(FileNotFoundError(2, "gone")) and not is_transient(ValueError("bad"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_smaller_batch_halves_the_stage_model_batch_down_to_one():
    settings = override(BuildSettings(), **{"detector.batch_size": 8})
    assert smaller_batch(settings, "detect").detector.batch_size == 4
    assert smaller_batch(settings, "detect").segmenter.batch_size == settings.segmenter.batch_size
    assert smaller_batch(override(settings, **{"detector.batch_size": 1}), "detect") is None
    assert smaller_batch(settings, "source") is None  # reads no settings section: nothing to halve


def test_artifact_key_is_lowercase_digits_dashes():
    assert artifact_key("My Dataset_v2 (test)", "yield") == "my-dataset-v2-test-yield"
    assert artifact_key("___", "progress") == "refany3d-progress"


def test_build_dataset_other_until_replaces_earlier_shards(tmp_path, s200k_source):
    out = tmp_path / "out"
    first = build_dataset(_settings(out, s200k_source))
    split_shards = set(shard_bytes(out))
    second = build_dataset(_settings(out, s200k_source, until="quality"))
    assert second["version"] != first["version"]  # other shards: a new dataset version
    assert read_version(str(out)).shards == tuple(sorted(shard_bytes(out)))
    # Only this build's shards remain: no mix of `--until split` and `--until quality` rows.
    assert set(shard_bytes(out)).isdisjoint(split_shards)
    assert len(shard_ids(out)) == 7  # rows that passed the quality filter, no views
    assert sorted(r["stage"] for r in rejects(out)) == ["quality"]


def test_build_dataset_batches_in_flight_does_not_change_output(tmp_path, s200k_source):
    one = build_dataset(_settings(tmp_path / "one", s200k_source, **{"runtime.batches_in_flight": 1}))
    many = build_dataset(_settings(tmp_path / "many", s200k_source, **{"runtime.batches_in_flight": 8}))
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "many")
    assert one["stats"] == many["stats"]


def test_scheduler_runs_serial_stage_tasks_one_at_a_time(tmp_path, s200k_source):
    """Shard tasks hold a whole shard in memory: never two at once, even with free workers."""
    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    @task(name="fake-stage")
    def fake_stage(stage, batch_id, inputs, settings, build_id, key, source_url) -> StageResult:
        start = time.monotonic()
        time.sleep(0.3 if STAGES[stage].serial else 0.01)
        with lock:
            spans.append((stage, start, time.monotonic()))
        return StageResult()

    settings = _settings(tmp_path / "out", s200k_source, **{"runtime.batch_size": 2})
    batches = plan_source(settings)
    stages = build_stages(settings.until)
    with ThreadPoolTaskRunner(max_workers=2) as runner:
        scheduler = Scheduler(runner, {s: fake_stage for s in stages}, settings, "build-id")
        for i, batch in enumerate(batches):
            scheduler.start(i, batch, {s: f"{s}-key" for s in stages})
        finished = sorted(scheduler.next_finished_batch()[0] for _ in batches)

    assert [s for s in STAGES if STAGES[s].serial] == ["shard"] and len(batches) == 4
    assert finished == list(range(len(batches)))
    shards = sorted((start, end) for stage, start, end in spans if stage == "shard")
    assert len(shards) == len(batches)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(shards, shards[1:]))
