"""bench/gpu_build_bench.py on the CPU with toy-sized configs, so the GPU bench cannot rot: its
replacement wrapper, how it cuts the DAG where a stage's libraries are missing, its report, and
the whole run (the DAG to depth plus the mesh networks in the fast test; the whole DAG through
Prefect and a plain loop in the slow one)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import trimesh

from tests.bench import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("gpu_build_bench")


class _Network:
    name = "net"

    def __init__(self) -> None:
        self.seen = []

    def detect(self, images, prompts):
        self.seen.append((images, prompts))
        return "network answer"


class _Truth:
    def detect(self, images, prompts):
        return f"truth for {prompts}"


def test_truth_after_runs_the_network_then_returns_the_truth_on_that_instance_only(bench):
    net, other = _Network(), _Network()
    wrapper = bench.TruthAfter.install(net, "detect", _Truth())
    assert net.detect([1], "mug") == "truth for mug"
    assert net.seen == [([1], "mug")] and wrapper.calls == 1
    assert bench.TruthAfter.install(net, "detect", _Truth()) is wrapper  # installed once
    assert net.name == "net+truth" and other.name == "net"
    assert other.detect([2], "car") == "network answer"


class _Mesher:
    name = "hunyuan3d"

    def __init__(self, faces: int) -> None:
        self.faces, self.calls = faces, 0

    def generate(self, images, samples, options, seed, deadline):
        """A subdivided box (`faces` 1), with `faces - 1` faces fewer, or None (0)."""
        self.calls += 1
        if not self.faces:
            return [None for _ in samples]
        box = trimesh.creation.box().subdivide_to_size(0.05)
        return [trimesh.Trimesh(box.vertices, box.faces[: len(box.faces) + 1 - self.faces]) for _ in samples]


class _TruthMesher:
    def __init__(self) -> None:
        self.made = 0

    def generate(self, images, samples, options, seed, deadline):
        self.made += len(samples)
        return [trimesh.creation.icosphere(subdivisions=1) for _ in samples]  # 80 faces


def test_mesh_truth_after_makes_each_truth_once_at_about_the_networks_face_count(bench):
    network, truth = _Mesher(faces=1), _TruthMesher()
    made_by_network = len(network.generate([None], [None], None, 0, 0.0)[0].faces)
    wrapper = bench.MeshTruthAfter.install(network, "generate", truth)
    samples = [SimpleNamespace(sample_id="a"), SimpleNamespace(sample_id="b")]
    first = network.generate([None, None], samples, None, 0, 0.0)
    again = network.generate([None, None], samples, None, 0, 0.0)
    assert network.calls == 3 and wrapper.calls == 2 and truth.made == 2  # the truth made once per object
    faces = len(first[0].faces)
    assert 0.4 * made_by_network <= faces < 1.6 * made_by_network and faces % 80 == 0  # the nearest x4 step
    assert [len(m.faces) for m in again] == [faces, faces] and again[0] is not first[0]
    network.faces = 2  # fp16 decoding moved Hunyuan3D's count a little: the truth is not made again
    network.generate([None, None], samples, None, 0, 0.0)
    assert truth.made == 2


def test_cpu_seconds_count_the_post_processing_processes(bench):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(sum, range(1)).result()  # started
        before_self, before = time.process_time(), bench._cpu_s()
        pool.submit(_busy, 1.0).result()
        assert bench._cpu_s() - before > 0.8 + (time.process_time() - before_self)


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cuda_settings_are_the_gpu_pools_profile_where_the_bench_sets_nothing(bench):
    from refany3d.flows.deployments import GPU_PROFILE

    weights = dict.fromkeys(["gdino", "sam", "depth", "hunyuan3d", "lpips"], "/w")
    args = SimpleNamespace(device="cuda", dtype="float16", batch_rows=2, tiny=False)
    cuda = bench.build_settings(args, weights, "/src/*.parquet", "fast", "/out", "shard", 16)
    assert cuda.mesher.compile is True and cuda.detector.batch_size == GPU_PROFILE["detector.batch_size"]
    assert cuda.mesher.dit == "turbo" and cuda.runtime.workers == 16  # the bench's own settings stay
    cpu = bench.build_settings(
        SimpleNamespace(**{**vars(args), "device": "cpu"}), weights, "/s", "fast", "/o", "shard", 2
    )
    assert cpu.mesher.compile is False


def test_runnable_until_keeps_the_depth_branch_without_the_mesh_stage(bench):
    assert bench.runnable_until("shard", {}) == "render"
    assert bench.runnable_until("shard", {"mesh": ["pymeshlab"], "render": ["open3d"]}) == "depth"
    assert bench.runnable_until("segment", {"mesh": ["open3d"]}) == "segment"
    assert bench.runnable_until("shard", {"verify": ["lpips"]}) == "pose"


def test_sampler_timeline_and_busy_seconds(bench):
    sampler = bench.Sampler()
    sampler._handle = object()  # as if NVML answered: rows are (t, util %, GPU GiB, RSS GiB, cores busy)
    sampler.rows = [(float(t), 100.0 if t < 5 else 0.0, 3.0, 1.0, 2.0 if t < 5 else 12.0) for t in range(10)]
    assert sampler.busy_s(0, 4) == pytest.approx(4.0)
    out = sampler.summary(0, 9)
    assert out["gpu_busy_fraction_whole_run"] == 0.5 and out["gpu_used_peak_gib"] == 3.0
    assert out["gpu_busy_fraction"] == 0.375  # steady: t = 2 ... 9 (after the first fifth), 3 of 8 busy
    assert len(out["timeline"]) == 60 and out["timeline"][0] == 1.0 and out["timeline"][-1] == 0.0
    assert out["cores_timeline"][0] == 2.0 and out["cores_timeline"][-1] == 12.0


def test_gpu_waits_rank_where_the_stage_threads_were_while_the_gpu_idled(bench):
    sampler = bench.Sampler()
    sampler._handle = object()
    sampler.rows = [(float(t), 0.0, 1.0, 1.0, 1.0) for t in range(4)]
    lock, pose = "mesh.infer > _device_lock.py:locked:26", "pose.pose > icp.py:step:9"
    sampler.waits = [
        (0.0, (lock, lock, pose)),
        (1.0, (lock,)),
        (2.0, (pose,)),
        (3.0, (lock,)),
        (9.0, (pose,)),
    ]
    assert sampler.summary(0, 3)["gpu_waits"] == [  # a place counts once per sample; t=9 is outside
        {"where": lock, "share_of_idle": 0.75},
        {"where": pose, "share_of_idle": 0.5},
    ]


def test_stage_threads_at_names_the_stage_function_and_where_its_thread_is(bench):
    from refany3d.stages._views import parallel_map

    inside, release = threading.Event(), threading.Event()

    def wait_inside(_):
        inside.set()
        release.wait(10)

    worker = threading.Thread(target=parallel_map, args=(wait_inside, [1]))
    worker.start()
    try:
        assert inside.wait(10)
        here = bench.stage_threads_at()
    finally:
        release.set()
        worker.join()
    # the thread in parallel_map waits for its pool's answer (the pool thread runs this file's code)
    assert [w.split(" > ")[1].rsplit(":", 1)[0] for w in here if w.startswith("_views.")] == [
        "threading.py:wait"
    ]
    assert not any("test_gpu_build_bench" in w for w in bench.stage_threads_at())  # outside stages: none


def test_gil_summary_ranks_the_holding_threads_innermost_frames(bench):
    raw = "\n".join([
        'thread (7): mesh;run (threading.py:1);_generate (mesh.py:9);__call__ (attention_processors.py:66) 6',
        'thread (8): pose;run (threading.py:1);pose (pose.py:3);icp (icp.py:40) 3',
        'thread (7): mesh;run (threading.py:1);_generate (mesh.py:9);__call__ (attention_processors.py:66) 2',
        'thread (9): MainThread 1',
        "garbage line",
    ])  # fmt: skip
    out = bench.gil_summary(raw, rate=100, seconds=0.24)
    assert out["gil_held_fraction"] == 0.5  # 12 samples of 24 possible
    assert out["gil_holders"] == [
        {"where": "mesh: _generate (mesh.py:9) > __call__ (attention_processors.py:66)", "share": 0.667},
        {"where": "pose: pose (pose.py:3) > icp (icp.py:40)", "share": 0.25},
        {"where": "MainThread: (no Python frame)", "share": 0.083},
    ]


@pytest.mark.skipif(
    not shutil.which("py-spy", path=f"{os.environ.get('PATH', '')}:{os.path.dirname(sys.executable)}"),
    reason="py-spy is not installed",
)
def test_gil_holders_names_the_thread_running_python_while_another_launches_torch_ops(bench, tmp_path):
    import torch

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(10_000))

    x = torch.ones(8)
    hog = threading.Thread(target=spin, name="hog")
    hog.start()
    try:
        with bench.GilHolders(tmp_path / "gil.txt") as gil:
            end = time.monotonic() + 2.0  # py-spy takes a moment to attach
            while time.monotonic() < end:  # each op releases the GIL and waits for it back
                torch.add(x, 1)
    finally:
        stop.set()
        hog.join()
    out = gil.summary()
    if "gil_note" in out:
        pytest.skip(f"py-spy cannot attach here: {out['gil_note']}")
    assert out["gil_held_fraction"] > 0.5
    assert out["gil_holders"][0]["where"].startswith("hog: ") and out["gil_holders"][0]["share"] > 0.8


def test_native_dumps_wait_for_an_idle_second_keep_apart_and_stop_at_the_limit(bench, tmp_path, monkeypatch):
    dumps = bench.NativeDumps(tmp_path / "case.native", limit=2, after_s=1.0, every_s=5.0)
    calls = []
    dumps.exe = "py-spy"
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or _Done())
    ticks = [(0.0, True), (0.8, True), (0.9, False), (1.0, True), (2.0, True), (2.2, True), (6.9, True),
             (7.0, True), (20.0, True)]  # fmt: skip
    for t, idle in ticks:
        dumps.tick(t, idle)
    # idle since 1.0 (the busy tick at 0.9 reset it): the first at 2.0, the next 5 s later, then the limit
    assert dumps.taken == [
        {"t": 2.0, "idle_s": 1.0, "file": "case.native0.txt"},
        {"t": 7.0, "idle_s": 6.0, "file": "case.native1.txt"},
    ]
    assert calls[0][1:3] == ["dump", "--native"] and (tmp_path / "case.native1.txt").read_text() == "stacks"


class _Done:
    stdout, stderr, returncode = "stacks", "", 0


def test_core_clock_counts_a_busy_core(bench):
    clock = bench._CoreClock()
    _busy(0.5)
    assert 0.5 <= clock.busy() <= (os.cpu_count() or 1)


def test_markdown_page_has_the_tables_the_busy_bar_and_the_plot(bench, tmp_path):
    stages = {"detect": {"wall_s": 1.0, "cpu_s": 0.5, "gpu_busy_s": 0.8, "kept": 4, "dropped": 0}}
    row = {"samples": 4, "sharded": 4, "wall_s": 10.0, "samples_per_hour": 1440.0, "gpu_busy_fraction": 0.6,
           "gpu_busy_fraction_whole_run": 0.5, "cores_busy": 7.5, "gpu_used_peak_gib": 30.0, "host_rss_peak_gib": 9.0,
           "timeline": [1.0] * 30 + [0.0] * 30, "cores_timeline": [16.0] * 30 + [0.0] * 30, "stages": stages,
           "gpu_waits": [{"where": "mesh.infer > x.py:f:1", "share_of_idle": 0.9}],
           "spans": [[0, "detect", 0.0, 1.0], [1, "shard", 1.0, 2.0]]}  # fmt: skip
    report = {"machine": {"gpu": "H200", "cpu_count": 16}, "date": "today", "command": "python bench/gpu_build_bench.py",
              "stages": ["detect", "shard"], "skipped": {"mesh": ["open3d"]}, "replaced": {"detect": "boxes"},
              "paths": {"fast": {"plain": row, "mesh_networks": {"objects": 2, "s_per_object": 1.0, "wall_s": 2.0}}}}  # fmt: skip
    md = tmp_path / "page.md"
    bench.write_markdown(report, md, md.with_suffix(".png"))
    page = md.read_text()
    assert "| fast | plain | 4 | 10.0 | 1440 | 0.6 | 0.5 | 7.5 | 30.0 | 9.0 |" in page
    assert "    |" + "@" * 30 + " " * 30 + "|" in page and "skipped (missing modules)" in page
    assert (
        page.count("    |" + "@" * 30 + " " * 30 + "|") == 2 and "CPU cores busy over the run (of 16)" in page
    )
    assert "| `mesh.infer > x.py:f:1` | 0.9 |" in page
    assert md.with_suffix(".png").stat().st_size > 0 and "![GPU busy over time](page.png)" in page
    assert "mesh_networks" in bench.summary_table(report)


def test_tiny_run_to_depth_writes_json_markdown_and_mesh_networks(bench, tmp_path):
    out = tmp_path / "gpu_build.json"
    report = bench.main(["--tiny", "--rows", "1", "--batch-rows", "1", "--view-size", "160", "--paths", "fast",
                         "--modes", "serial,plain", "--until", "depth", "--work", str(tmp_path / "work"),
                         "--variant", "short:until=segment", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["stages"] == report["stages"]
    assert report["stages"] == ["source", "quality", "split", "detect", "segment", "depth", "shard"]
    serial, plain = report["paths"]["fast"]["serial"], report["paths"]["fast"]["plain"]
    for row in (serial, plain):
        assert "error" not in row, row.get("error")
        assert row["samples"] == 2 and row["samples_per_hour"] > 0
        assert set(row["stages"]) == set(report["stages"])
    assert serial["stages"]["depth"]["cpu_s"] > 0 and plain["stages"]["depth"]["tasks"] == 1
    assert plain["cpu_s"] > 0 and 0 < plain["cores_busy"] <= (os.cpu_count() or 1) + 0.5
    # one span per stage call, in the run's seconds
    assert sorted(s for _, s, _, _ in plain["spans"]) == sorted(report["stages"])
    assert all(0 <= t0 <= t1 <= plain["wall_s"] for *_, t0, t1 in plain["spans"])
    assert set(report["replaced"]) == {"detect", "segment", "depth", "mesh"}
    mesh = report["paths"]["fast"]["mesh_networks"]
    assert "error" not in mesh, mesh.get("error")
    assert mesh["objects"] == 2 and all(f > 0 for f in mesh["raw_faces"])
    # each mode again with the variant's settings, in the same process: here a shorter DAG
    short = report["paths"]["fast"]["plain@short"]
    assert "error" not in short, short.get("error")
    assert short["settings"] == {"until": "segment"} and report["variants"] == {"short": {"until": "segment"}}
    assert sorted(s for _, s, _, _ in short["spans"]) == sorted(
        ["source", "quality", "split", "detect", "segment", "shard"]
    )
    assert "serial@short" in report["paths"]["fast"]
    page = out.with_suffix(".md").read_text()
    assert "| fast | plain | 2 |" in page and "| fast | serial | 2 |" in page and "Replaced outputs" in page
    assert "| fast | plain@short | 2 |" in page


def test_variants_are_named_settings_and_a_bad_one_is_refused(bench):
    assert bench.parse_variants(["bif8:runtime.batches_in_flight=8,runtime.workers=24"]) == {
        "bif8": {"runtime.batches_in_flight": "8", "runtime.workers": "24"}
    }
    for bad in (["bif8"], [":runtime.workers=2"], ["a:x=1", "a:y=2"]):
        with pytest.raises(ValueError, match="--variant"):
            bench.parse_variants(bad)


def _tracing_call(barrier_stage: str, parties: int):
    """A stage call that names its inputs, meets `parties` calls of `barrier_stage` at a barrier
    (broken if they do not run at once), and records each stage's most calls at a time."""
    lock, running, most = threading.Lock(), Counter(), Counter()
    barrier = threading.Barrier(parties, timeout=20)

    def call(stage, inputs):
        with lock:
            running[stage] += 1
            most[stage] = max(most[stage], running[stage])
        try:
            if stage == barrier_stage:
                barrier.wait()
            time.sleep(0.05)
            return f"{stage}<{inputs if stage == 'source' else '+'.join(inputs)}>"
        finally:
            with lock:
                running[stage] -= 1

    return call, most


def test_plain_schedule_overlaps_batches_feeds_each_call_its_own_parents_and_runs_serial_stages_alone(bench):
    from refany3d.stages.dag import build_stages, plan_inputs

    stages = build_stages("shard")
    call, most = _tracing_call("detect", parties=2)  # both batches' detect at once, or a broken barrier
    done = list(bench.overlapped(["b0", "b1"], stages, "shard", window=2, workers=4, call=call))
    assert sorted((i, s) for i, s, *_ in done) == sorted((i, s) for i in (0, 1) for s in stages)
    assert most["shard"] == 1 and most["detect"] == 2  # shard is serial; the batches ran side by side
    results = {(i, s): r for i, s, _, r, *_ in done}
    pose_inputs = [results[0, p] for p in plan_inputs("pose", "shard")]
    assert results[0, "pose"] == f"pose<{'+'.join(pose_inputs)}>" and len(pose_inputs) == 2
    assert "b1" not in results[0, "shard"] and "b0" in results[0, "shard"]


def test_plain_schedule_keeps_at_most_its_window_of_batches_in_flight(bench):
    from refany3d.stages.dag import build_stages

    stages = build_stages("shard")
    call, _ = _tracing_call("none", parties=1)
    done = list(bench.overlapped(["b0", "b1", "b2"], stages, "shard", window=1, workers=4, call=call))
    span = {i: (min(t0 for j, _, _, _, t0, _ in done if j == i), max(t1 for j, *_, t1 in done if j == i))
            for i in range(3)}  # fmt: skip
    assert span[0][1] <= span[1][0] and span[1][1] <= span[2][0]


@pytest.mark.slow
def test_tiny_whole_dag_through_prefect_and_plain_loop(bench, tmp_path):
    report = bench.main(["--tiny", "--rows", "3", "--batch-rows", "2", "--view-size", "192", "--paths", "fast",
                         "--modes", "plain,prefect", "--workers", "2", "--work", str(tmp_path / "work"),
                         "--json", str(tmp_path / "gpu_build.json")])  # fmt: skip
    assert report["stages"][-2:] == ["render", "shard"] and not report["skipped"]
    for mode in ("plain", "prefect"):
        row = report["paths"]["fast"][mode]
        assert "error" not in row, row.get("error")
        assert row["samples"] == 4 and row["sharded"] >= 1
        assert len(row["spans"]) == sum(st["tasks"] for st in row["stages"].values())
    assert all(report["paths"]["fast"][m]["stages"]["mesh"]["tasks"] == 2 for m in ("plain", "prefect"))
