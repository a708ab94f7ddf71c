import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh

from refany3d.config import override
from refany3d.models.mesher import MesherTimeout
from refany3d.records import MESH
from refany3d.render.mesh import load_mesh
from refany3d.render.texture import raycast_colours
from refany3d.stages import mesh as mesh_module
from refany3d.stages._views import read_mask, read_view
from refany3d.stages.detect import detect
from refany3d.stages.mesh import (
    MESH_EMPTY,
    MESH_NOT_MANIFOLD,
    MESH_TIMEOUT,
    MESHER_OUT_OF_MEMORY,
    POST_PROCESS_CRASHED,
    UV_ATLAS_FAILED,
    mesh,
)
from refany3d.stages.segment import segment
from refany3d.testing.views import synthetic_views

FAST = {"mesher.uv_atlas_size": 512, "mesher.target_faces": 6000, "texturer.fit_resolution": 128}


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    views, ctx, settings = synthetic_views(tmp_path_factory.mktemp("mesh"), rows=1, size=128)
    kept = segment(detect(views, settings, ctx).kept, settings, ctx).kept
    return kept, ctx, override(settings, **FAST)


@pytest.fixture(scope="module")
def meshed(segmented):
    views, ctx, settings = segmented
    return mesh(views, settings, ctx)


def _psnr_inside(sample, ctx) -> tuple[float, float]:
    """(PSNR in dB of the re-rendered asset vs the photo where the mask and the asset overlap,
    fraction of mask pixels the asset covers) at the recorded front camera."""
    photo = np.asarray(read_view(ctx.store, sample)).astype(np.float64)
    mask = np.asarray(read_mask(ctx.store, sample.artifacts["mask"])) > 127
    asset = load_mesh(ctx.store.get(sample.artifacts[MESH]), file_type="glb")
    pose = np.array(sample.front_pose).reshape(4, 4)
    k = np.array(sample.front_intrinsics).reshape(3, 3)
    rgb, seen = raycast_colours(asset, pose, k, photo.shape[1], photo.shape[0])
    both = mask & seen
    mse = ((rgb[both] - photo[both]) ** 2).mean()
    return 10 * np.log10(255.0**2 / mse), both.sum() / mask.sum()


def test_mesh_truth_writes_textured_canonical_glb(meshed, segmented):
    views, ctx, settings = segmented
    assert len(meshed.kept) == len(views) and not meshed.dropped
    for sample in meshed.kept:
        asset = load_mesh(ctx.store.get(sample.artifacts[MESH]), file_type="glb")
        assert asset.visual.kind == "texture" and asset.visual.uv is not None
        assert asset.visual.material.baseColorTexture.size == (512, 512)
        lo, hi = asset.bounds
        assert np.allclose((lo + hi) / 2, 0, atol=1e-5) and (hi - lo).max() / 2 == pytest.approx(1, abs=1e-5)
        assert sample.metrics["mesh_faces"] == len(asset.faces) <= 6000
        assert sample.metrics["mesh_faces"] >= 0.95 * 6000  # reduction lands within 5 % of the target
        assert sample.metrics["mesh_uv_charts"] >= 1 and "mesh_seconds" not in sample.metrics
        assert sample.backends["mesh"] == "truth"
        assert len(sample.front_pose) == 16 and len(sample.front_intrinsics) == 9


def test_mesh_projection_rerenders_the_photo_at_the_front_camera(meshed, segmented):
    _, ctx, _ = segmented
    for sample in meshed.kept:
        psnr, covered = _psnr_inside(sample, ctx)
        # the truth segmenter's mask bleeds onto the background on one stretch: no mesh covers that
        assert psnr >= 25.0 and covered >= 0.9 and sample.metrics["mesh_front_iou"] > 0.85


def _geometry(sample, ctx) -> np.ndarray:
    asset = load_mesh(ctx.store.get(sample.artifacts[MESH]), file_type="glb")
    return np.unique(np.round(asset.vertices, 5), axis=0)


def test_mesh_rerun_gives_the_same_surface_and_camera(meshed, segmented):
    # Open3D's UV atlas packs its charts differently on every call (not seedable), so the GLB's
    # UVs and texture vary between runs; the surface and the fitted camera must not.
    views, ctx, settings = segmented
    again = mesh(views, settings, ctx)
    for first, second in zip(meshed.kept, again.kept, strict=True):
        assert np.array_equal(_geometry(first, ctx), _geometry(second, ctx))
        assert np.allclose(first.front_pose, second.front_pose, atol=1e-9)


class _Stub:
    """A mesher returning given meshes (or raising) for every object."""

    name = "stub"

    def __init__(self, make, fail=None):
        self.make, self.fail, self.calls = make, fail, []

    def generate(self, images, samples, options, seed, deadline):
        self.calls.append(len(samples))
        if self.fail is not None and self.fail(len(samples)):
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return [self.make() for _ in samples]


def _with_mesher(monkeypatch, stub):
    monkeypatch.setattr(mesh_module, "load_mesher", lambda settings: stub)


def _reasons(result):
    return [r.reason for r in result.dropped]


def test_mesh_no_surface_drops_mesh_empty(monkeypatch, segmented):
    views, ctx, settings = segmented
    _with_mesher(monkeypatch, _Stub(lambda: None))
    assert _reasons(mesh(views, settings, ctx)) == ["mesh_empty"] * len(views) and MESH_EMPTY == "mesh_empty"


def _fin() -> trimesh.Trimesh:
    """Three triangles on one edge: non-manifold, and no repair can make it manifold."""
    v = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1]], float)
    return trimesh.Trimesh(v, [[0, 1, 2], [0, 1, 3], [0, 1, 4]], process=False)


def test_mesh_non_manifold_after_repair_drops_mesh_not_manifold(monkeypatch, segmented):
    views, ctx, settings = segmented
    _with_mesher(monkeypatch, _Stub(_fin))
    assert _reasons(mesh(views, settings, ctx)) == ["mesh_not_manifold"] * len(views)
    assert MESH_NOT_MANIFOLD == "mesh_not_manifold"


def test_mesh_failing_uv_atlas_drops_uv_atlas_failed(monkeypatch, segmented):
    views, ctx, settings = segmented

    def broken(*args, **kwargs):
        raise RuntimeError("[Open3D Error] UVAtlasPartition: Non-manifold mesh")

    _with_mesher(monkeypatch, _Stub(lambda: trimesh.creation.icosphere(subdivisions=3)))
    monkeypatch.setattr(mesh_module, "compute_uv_atlas", broken)
    assert _reasons(mesh(views, settings, ctx)) == ["uv_atlas_failed"] * len(views)
    assert UV_ATLAS_FAILED == "uv_atlas_failed"


def test_mesh_over_budget_drops_mesh_timeout(segmented):
    views, ctx, settings = segmented
    result = mesh(views, override(settings, **{"mesher.timeout_s": 1e-4}), ctx)
    assert _reasons(result) == ["mesh_timeout"] * len(views) and MESH_TIMEOUT == "mesh_timeout"


def test_mesh_out_of_memory_alone_drops_mesher_out_of_memory(monkeypatch, segmented):
    views, ctx, settings = segmented
    stub = _Stub(lambda: None, fail=lambda n: True)
    _with_mesher(monkeypatch, stub)
    result = mesh(views, override(settings, **{"mesher.batch_size": 2}), ctx)
    assert _reasons(result) == ["mesher_out_of_memory"] * 2 and MESHER_OUT_OF_MEMORY == "mesher_out_of_memory"
    assert stub.calls == [2, 1, 1]  # the batch was split before giving up


def test_mesh_out_of_memory_in_a_batch_retries_halves(monkeypatch, segmented):
    views, ctx, settings = segmented
    stub = _Stub(lambda: trimesh.creation.icosphere(subdivisions=3), fail=lambda n: n > 1)
    _with_mesher(monkeypatch, stub)
    result = mesh(views, override(settings, **{"mesher.batch_size": 2}), ctx)
    assert len(result.kept) == 2 and not result.dropped and stub.calls == [2, 1, 1]


class _TimesOutOnce:
    """A mesher that makes the first `made` meshes of its first chunk, then passes its deadline;
    it records each call's size and budget (deadline - now)."""

    name = "stub"

    def __init__(self, made: int):
        self.made, self.calls = made, []

    def generate(self, images, samples, options, seed, deadline):
        self.calls.append((len(samples), deadline - time.monotonic()))
        meshes = [trimesh.creation.icosphere(subdivisions=3) for _ in samples]
        if len(self.calls) == 1:
            raise MesherTimeout("passed its deadline", done=meshes[: self.made])
        return meshes


def test_mesh_timeout_is_per_sample_and_keeps_the_meshes_already_made(monkeypatch, segmented):
    views, ctx, settings = segmented
    assert len(views) == 2
    stub = _TimesOutOnce(made=1)
    _with_mesher(monkeypatch, stub)
    result = mesh(views, override(settings, **{"mesher.batch_size": 2, "mesher.timeout_s": 60.0}), ctx)
    assert _reasons(result) == [] and len(result.kept) == 2  # the made mesh kept, the other retried
    assert [n for n, _ in stub.calls] == [2, 1]
    assert 100.0 < stub.calls[0][1] <= 120.0 and 40.0 < stub.calls[1][1] <= 60.0  # timeout_s per object


def test_mesh_timeout_with_nothing_made_splits_down_to_single_objects(monkeypatch, segmented):
    views, ctx, settings = segmented
    stub = _TimesOutOnce(made=0)
    _with_mesher(monkeypatch, stub)
    result = mesh(views, override(settings, **{"mesher.batch_size": 2}), ctx)
    assert _reasons(result) == [] and [n for n, _ in stub.calls] == [2, 1, 1]
    assert all(
        r.transient for r in mesh(views, override(settings, **{"mesher.timeout_s": 1e-4}), ctx).dropped
    )


def test_mesh_post_processes_give_the_same_assets(meshed, segmented):
    views, ctx, settings = segmented
    in_pool = mesh(views, override(settings, **{"mesher.post_processes": 2}), ctx)
    assert not in_pool.dropped and len(in_pool.kept) == len(meshed.kept)
    for first, second in zip(meshed.kept, in_pool.kept, strict=True):
        assert second.artifacts[MESH] == first.artifacts[MESH]  # content-addressed: the same GLB bytes
        assert second.front_pose == first.front_pose and second.metrics == first.metrics


class _DiesWhenUnpickled:
    """A "mesh" that ends the process that unpickles it: a post-processing process crashing."""

    def __reduce__(self):
        import os

        return os._exit, (3,)


def test_mesh_dead_post_process_drops_mesh_post_process_crashed_and_the_next_chunk_runs(
    monkeypatch, segmented
):
    views, ctx, settings = segmented
    made = iter([_DiesWhenUnpickled(), trimesh.creation.icosphere(subdivisions=3)])
    _with_mesher(monkeypatch, _Stub(lambda: next(made)))
    result = mesh(views, override(settings, **{"mesher.post_processes": 1, "mesher.batch_size": 1}), ctx)
    assert _reasons(result) == ["mesh_post_process_crashed"] and len(result.kept) == 1
    assert (
        POST_PROCESS_CRASHED == "mesh_post_process_crashed" and POST_PROCESS_CRASHED in mesh_module.TRANSIENT
    )
    assert result.dropped[0].transient


def test_post_processing_processes_have_temp_directories_of_their_own():
    # hy3dgen's leaked PLYs are removed by name from the temp directory: shared between processes,
    # one process's clean-up would remove the files another is still using.
    own = mesh_module._POST_PROCESSES.submit(1, tempfile.gettempdir).result()
    assert own != tempfile.gettempdir() and Path(own).parent == Path(tempfile.gettempdir())
