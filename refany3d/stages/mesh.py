"""Mesh stage: a textured 3D asset of each segmented object.

Per chunk of `mesher.batch_size` objects: the view cut out with its mask (RGBA, the object in
alpha) goes to the mesher (`hunyuan3d`, or `truth` on synthetic rows), which returns a raw surface
in its canonical frame. Per object: hy3dgen's clean-up and face reduction to `mesher.target_faces`,
repair, normalisation into [-1, 1]³, the UV atlas (`mesher.uv_unwrapper`), then the texturer (`projection`: the photo
projected from the fitted front camera). The GLB (UVs + base-colour texture) goes to the artifact
store; the sample gets `front_pose` / `front_intrinsics` and the metrics `mesh_faces`,
`mesh_uv_charts`, `mesh_front_iou`, `mesh_texture_seen`. The seconds each object took go to the
log, not the record: shards must be the same bytes on every build.

The mesher of the next chunk runs while this chunk's objects are post-processed on a worker thread,
or, with `mesher.post_processes`, in that many processes shared by every mesh task of the worker
process (`_processes.py`): reduction, the UV atlas and texturing are CPU work that threads would
serialise behind the GIL while the GPU waits. A post-processing process that dies drops its object
`mesh_post_process_crashed` (transient) and the build goes on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pymeshlab  # noqa: F401  (see below)
import trimesh
from PIL import Image

from refany3d.config import BuildSettings
from refany3d.models.mesher import Mesher, MesherTimeout, load_mesher
from refany3d.models.texturer import Texturer, load_texturer
from refany3d.records import MASK, MESH, Sample, StageResult
from refany3d.render.mesh import (
    clean_and_reduce,
    compute_uv_atlas,
    is_manifold,
    mesh_to_glb,
    normalize_mesh,
    own_temp_directory,
)
from refany3d.stages._processes import Call, Crashed, SharedProcessPool
from refany3d.stages._views import Outcome, batched, parallel_map, pipelined, read_mask, read_view, record
from refany3d.stages.context import StageContext

# pymeshlab is imported here, with this module, on purpose: loaded for the first time from a worker
# thread together with torch (as hy3dgen's post-processors would), the process corrupts its heap
# at exit (glibc "malloc_consolidate(): unaligned fastbin chunk", exit code 134). Stage modules are
# imported on the main thread (CLI preflight, test collection).
STAGE = "mesh"
MESH_EMPTY = "mesh_empty"  # no surface, or nothing left after clean-up
MESH_NOT_MANIFOLD = "mesh_not_manifold"  # still non-manifold after repair (the UV atlas needs manifold)
UV_ATLAS_FAILED = "uv_atlas_failed"
MESH_TIMEOUT = "mesh_timeout"  # over `mesher.timeout_s` (checked between steps)
MESHER_OUT_OF_MEMORY = "mesher_out_of_memory"  # out of memory even for this object alone
POST_PROCESS_CRASHED = "mesh_post_process_crashed"  # its post-processing process died
# Drops that say nothing about the sample: the next run tries it again (they are never cached).
TRANSIENT = (MESH_TIMEOUT, MESHER_OUT_OF_MEMORY, POST_PROCESS_CRASHED)

# What the mesher gave one object: its raw surface, None (no surface) or a drop reason.
Raw = trimesh.Trimesh | None | str


def _read(store, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(view (H, W, 3) uint8, mask (H, W) bool) of a segmented sample."""
    image = np.asarray(read_view(store, sample))
    return image, np.asarray(read_mask(store, sample.artifacts[MASK])) > 127


def _cutout(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The object as an RGBA image: the view with the mask as alpha (nothing else removed)."""
    return Image.fromarray(np.dstack([image, mask.astype(np.uint8) * 255]), mode="RGBA")


def _is_out_of_memory(err: BaseException) -> bool:
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")  # only if a backend imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate(
    mesher: Mesher,
    cutouts: Sequence[Image.Image],
    chunk: Sequence[Sample],
    settings: BuildSettings,
    seed: int,
) -> list[Raw]:
    """One raw result per object. `mesher.timeout_s` is per object: a chunk of k objects has k
    times that. On a timeout the meshes already made are kept and the rest run again with their
    own budget (halved down to single objects when none was made); out of memory splits the
    chunk in halves likewise. An object that times out or does not fit alone becomes a drop reason."""
    opts = settings.mesher
    try:
        return mesher.generate(cutouts, chunk, opts, seed, time.monotonic() + opts.timeout_s * len(chunk))
    except MesherTimeout as err:
        done: list[Raw] = list(err.done[: len(chunk)])
        if done:
            n = len(done)
            return (
                done + _generate(mesher, cutouts[n:], chunk[n:], settings, seed) if n < len(chunk) else done
            )
        if len(chunk) == 1:
            return [MESH_TIMEOUT]
    except Exception as err:
        if not _is_out_of_memory(err):
            raise
        _free_accelerator_memory()
        if len(chunk) == 1:
            return [MESHER_OUT_OF_MEMORY]
    half = len(chunk) // 2
    return _generate(mesher, cutouts[:half], chunk[:half], settings, seed) + _generate(
        mesher, cutouts[half:], chunk[half:], settings, seed
    )


def _unwrap(mesh: trimesh.Trimesh, settings: BuildSettings) -> tuple[trimesh.Trimesh, int] | str:
    """The reduced, repaired, normalised mesh with its UV atlas, or the drop reason."""
    opts = settings.mesher
    reduced = clean_and_reduce(mesh, opts.target_faces, opts.coarse_factor)  # repaired
    if len(reduced.faces) == 0:
        return MESH_EMPTY
    if not is_manifold(reduced):
        return MESH_NOT_MANIFOLD
    canonical, _ = normalize_mesh(reduced)
    try:
        unwrapped, charts = compute_uv_atlas(
            canonical,
            opts.uv_atlas_size,
            opts.uv_partitions,
            method=opts.uv_unwrapper,
            chart_fraction=opts.uv_chart_fraction,
        )
    except RuntimeError:
        return UV_ATLAS_FAILED
    if charts <= 0 or not np.all(np.isfinite(unwrapped.visual.uv)):
        return UV_ATLAS_FAILED
    return unwrapped, charts


@dataclass(frozen=True)
class Finished:
    """One object's post-processed asset: what the stage stores and records (picklable, so it
    comes back from a post-processing process)."""

    glb: bytes
    pose: np.ndarray  # (4, 4) fitted front camera, camera-to-world
    intrinsics: np.ndarray  # (3, 3)
    faces: int
    charts: int
    iou: float
    seen: float
    seconds: float


def _post_process(
    raw: Raw, view: tuple[np.ndarray, np.ndarray], generation_s: float, settings: BuildSettings
) -> Finished | tuple[str, float, str]:
    """One object's reduced, unwrapped and textured GLB, or (reason, metric, detail) of its drop.
    Pure CPU work on picklable inputs: it runs on the stage's thread or in a post-processing process."""
    start = time.monotonic()
    budget = settings.mesher.timeout_s

    def elapsed() -> float:
        return generation_s + time.monotonic() - start

    if isinstance(raw, str):
        return raw, elapsed(), ""
    if raw is None or len(raw.faces) == 0:
        return MESH_EMPTY, 0.0, "the mesher found no surface"
    unwrapped = _unwrap(raw, settings)
    if isinstance(unwrapped, str):
        return unwrapped, float(len(raw.faces)), f"raw mesh of {len(raw.faces)} faces"
    if elapsed() > budget:
        return MESH_TIMEOUT, elapsed(), "after the UV atlas"
    mesh, charts = unwrapped
    image, mask = view
    texturer: Texturer = load_texturer(settings)
    done = texturer.texture(mesh, image, mask, settings.mesher.uv_atlas_size, settings.texturer)
    if elapsed() > budget:
        return MESH_TIMEOUT, elapsed(), "after texturing"
    return Finished(
        mesh_to_glb(done.mesh),
        done.pose,
        done.intrinsics,
        len(mesh.faces),
        charts,
        done.iou,
        done.seen,
        elapsed(),
    )


def _keep(sample: Sample, done: Finished | tuple[str, float, str], ctx: StageContext) -> Outcome:
    """The kept sample with its stored GLB, or the drop as it came."""
    if not isinstance(done, Finished):
        return done
    out = sample.replace(
        front_pose=[float(v) for v in done.pose.ravel()],
        front_intrinsics=[float(v) for v in done.intrinsics.ravel()],
    )
    out.artifacts[MESH] = ctx.store.put_content("mesh", done.glb, ".glb")
    ctx.log.info(
        "mesh: %s took %.2f s (%d faces, %d charts)", sample.sample_id, done.seconds, done.faces, done.charts
    )
    out.metrics.update(
        mesh_faces=float(done.faces),
        mesh_uv_charts=float(done.charts),
        mesh_front_iou=done.iou,
        mesh_texture_seen=done.seen,
    )
    return out


# This worker process's post-processing processes (`mesher.post_processes`), shared by its mesh tasks.
_POST_PROCESSES = SharedProcessPool(initializer=own_temp_directory)


def _post_process_outcome(call: Call) -> Finished | tuple[str, float, str]:
    try:
        return call.result()
    except Crashed as err:
        return POST_PROCESS_CRASHED, 0.0, str(err)


def mesh(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    result = StageResult()
    if not samples:
        return result
    mesher = load_mesher(settings)
    processes = settings.mesher.post_processes

    def infer(chunk, views) -> tuple[list[Raw], float] | list[Call]:
        start = time.monotonic()
        raws = _generate(mesher, [_cutout(*v) for v in views], chunk, settings, ctx.seed)
        share = (time.monotonic() - start) / len(chunk)
        if not processes:
            return raws, share
        # Started now, not in `finish`: the post-processing of every chunk in flight shares the pool.
        return [
            _POST_PROCESSES.submit(processes, _post_process, raw, view, share, settings)
            for raw, view in zip(raws, views, strict=True)
        ]

    def finish(chunk, views, made) -> list[Outcome]:
        if processes:
            done = [_post_process_outcome(call) for call in made]
        else:
            raws, share = made
            done = [_post_process(r, v, share, settings) for r, v in zip(raws, views, strict=True)]
        return [_keep(sample, d, ctx) for sample, d in zip(chunk, done, strict=True)]

    for chunk, outcomes in pipelined(
        list(batched(samples, settings.mesher.batch_size)),
        lambda chunk: parallel_map(lambda s: _read(ctx.store, s), chunk),
        infer,
        finish,
        device=ctx.device,
    ):
        record(result, STAGE, mesher.name, chunk, outcomes, transient=TRANSIENT)
    return result
