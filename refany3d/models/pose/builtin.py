"""The built-in pose estimator: coarse rotation search + scaled ICP, then render-and-compare over
all 7 DoF (DESIGN §4, "6D pose"). This is the CPU path (numpy, Open3D ray casting), no learned
weights; `batched` runs the same search in torch on a GPU."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import trimesh

from refany3d.config import PoseSettings
from refany3d.models.pose.base import PoseNotFound, PoseResult
from refany3d.models.pose.coarse import coarse_candidates, front_hints, hint_start
from refany3d.models.pose.model import PoseModel, Similarity
from refany3d.models.pose.observe import NoObservation, observe
from refany3d.models.pose.refine import Fit, margin_against, refine

SURFACE_CHECK = 500  # surface samples that `distinct_answers` turns


def distinct_poses(
    candidates: list[tuple[float, Similarity]], count: int, min_deg: float
) -> list[Similarity]:
    """The best `count` poses, skipping any within `min_deg` of a better one (ICP converges many
    starts to the same basin; refining it twice is wasted work)."""
    chosen: list[Similarity] = []
    cos_min = np.cos(np.radians(min_deg))
    for _, pose in candidates:
        near = any((np.trace(pose.rotation @ c.rotation.T) - 1) / 2 > cos_min for c in chosen)
        if not near:
            chosen.append(pose)
        if len(chosen) == count:
            break
    return chosen


def distinct_answers(
    model: PoseModel,
    a: Similarity,
    b: Similarity,
    threshold: float = 0.02,
    basin_deg: float = 20.0,
    distance: Callable[[np.ndarray], float] | None = None,
) -> bool:
    """Whether poses `a` and `b` are different answers: rotations `basin_deg` or more apart whose
    surfaces, centred and at one scale, lie ADD-S `threshold` of the object's diameter or more
    apart. A symmetric shape's equivalent rotations are the same answer, and so are two fits in
    one basin that differ a little in rotation, scale or place (refinement noise). `distance`:
    the mean distance of `SURFACE_CHECK` samples turned by a rotation to the surface
    (default: `model.surface_distance`, Open3D)."""
    cos = (np.trace(a.rotation @ b.rotation.T) - 1.0) / 2.0
    if cos > np.cos(np.radians(basin_deg)):
        return False
    turn = a.rotation.T @ b.rotation
    moved = distance(turn) if distance else model.surface_distance(turn, SURFACE_CHECK)
    return moved >= threshold * 2.0 * model.radius


def half_turns(pose: Similarity) -> list[Similarity]:
    """`pose` turned by 180° about each of the mesh's axes, through the mesh origin."""
    out = []
    for axis in np.eye(3):
        turn = 2.0 * np.outer(axis, axis) - np.eye(3)  # rotation by π about `axis`
        out.append(Similarity(pose.rotation @ turn, pose.scale, pose.translation))
    return out


class BuiltinPoseEstimator:
    name = "builtin"
    needs_rgb = False

    def __init__(self, options: PoseSettings) -> None:
        self.options = options

    def estimate(
        self,
        mesh: trimesh.Trimesh,
        depth: np.ndarray,
        mask: np.ndarray,
        intrinsics: np.ndarray,
        rgb: np.ndarray | None = None,
    ) -> PoseResult:
        del rgb  # geometry only: the texture is the mesher's projection of this very image
        opts = self.options
        try:
            obs = observe(
                depth,
                mask,
                intrinsics,
                erosion_px=opts.erosion_px,
                grid_cells=opts.grid_cells,
                band_px=opts.band_px,
                max_points=opts.cloud_points,
            )
        except NoObservation as err:
            raise PoseNotFound(str(err)) from None
        model = PoseModel(mesh)
        coarse = coarse_candidates(model, obs, opts.view_directions, opts.in_plane_steps, opts.icp_keep)
        # Screen several distinct basins briefly (a handle's side, a box's face), then finish
        # the most promising ones: refinement costs far more per pose than ranking.
        starts = distinct_poses(coarse, opts.refine_candidates, 25.0)
        starts += [hint_start(model, obs.cloud, rot) for rot in front_hints(mesh)]  # the mesher's view
        screened: list[Fit] = [
            refine(model, obs, start, opts.screen_iterations, opts.depth_sigma, opts.silhouette_sigma_px)
            for start in starts
        ]
        if not screened:
            raise PoseNotFound("no pose hypothesis survived")
        screened.sort(key=lambda f: -f.score)
        finalists = [f.pose for f in screened[: opts.finish_candidates]]
        # A handle or a drawer front is a small part of the surface: the mirror basin of the body
        # (the best pose turned half a turn about a mesh axis) screens about as well as the true
        # one and only a full refinement tells them apart.
        finalists += half_turns(screened[0].pose)
        fits = [
            refine(model, obs, start, opts.refine_iterations, opts.depth_sigma, opts.silhouette_sigma_px)
            for start in finalists
        ]
        best = max(fits, key=lambda f: f.score)
        if best.score < opts.min_score:
            raise PoseNotFound(f"best fit scores {best.score:.3f} < pose.min_score {opts.min_score}")
        rivals = [f.pose for f in fits + screened if distinct_answers(model, best.pose, f.pose)]
        margin = margin_against(model, obs, best.pose, rivals)
        return PoseResult(best.pose.matrix(), float(best.pose.scale), float(best.score), float(margin))
