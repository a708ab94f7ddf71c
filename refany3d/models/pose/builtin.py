"""The built-in pose estimator: coarse rotation search + scaled ICP, then render-and-compare over
all 7 DoF (DESIGN §4, "6D pose"). This is the CPU path (numpy, Open3D ray casting), no learned
weights; `batched` runs the same search in torch on a GPU."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

from refany3d.config import PoseSettings
from refany3d.models.pose.base import PoseNotFound, PoseResult
from refany3d.models.pose.coarse import coarse_candidates, front_hints, hint_start
from refany3d.models.pose.model import PoseModel, Similarity
from refany3d.models.pose.observe import NoObservation, observe
from refany3d.models.pose.refine import Fit, margin_against, refine, score_pose

SURFACE_CHECK = 500  # surface samples that `distinct_answers` turns
SWEEP_DEG = (10.0, 20.0, 30.0)  # `axis_sweeps`' turns about each mesh axis, both ways
CUBE_SIDES = 0.15  # `cube_turns`: sides this close (relative) can trade places
REVOLUTION_GAP = 0.1  # `revolution_axes`: a sample stays if this close, in lateral RMS radii
REVOLUTION_SHARE = 0.75  # ... and an axis is one of revolution if this share of samples stays


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


def _turned(pose: Similarity, turns: np.ndarray, pivot: np.ndarray | None = None) -> list[Similarity]:
    """`pose` with each (3, 3) rotation of `turns` applied first, about the mesh point `pivot`
    (default the mesh origin), which stays where `pose` puts it."""
    if pivot is None:
        return [Similarity(pose.rotation @ turn, pose.scale, pose.translation) for turn in turns]
    at = pose.translation + pose.scale * pose.rotation @ pivot
    return [
        Similarity(pose.rotation @ turn, pose.scale, at - pose.scale * pose.rotation @ turn @ pivot)
        for turn in turns
    ]


def _cube_turns() -> np.ndarray:
    """(24, 3, 3): the rotations that map the mesh's axes onto themselves (signed permutations of
    determinant +1), the identity first, then the three half turns about the axes."""
    turns = [
        np.eye(3)[list(order)] * np.array(signs)[:, None]
        for order in itertools.permutations(range(3))
        for signs in itertools.product((1.0, -1.0), repeat=3)
    ]
    turns = [t for t in turns if np.linalg.det(t) > 0]
    # identity, then diagonal ones (half turns about an axis), then the rest
    turns.sort(key=lambda t: (not np.allclose(t, np.eye(3)), not np.allclose(t, np.diag(np.diag(t)))))
    return np.asarray(turns)


CUBE_TURNS = _cube_turns()


def half_turns(pose: Similarity) -> list[Similarity]:
    """`pose` turned by 180° about each of the mesh's axes, through the mesh origin."""
    return _turned(pose, CUBE_TURNS[1:4])


def cube_turns(pose: Similarity, model: PoseModel) -> list[Similarity]:
    """`pose` turned, about the mesh box's centre, by those of the other 20 cube symmetries of the
    mesh axes (quarter turns about an axis, thirds about a diagonal, halves about an edge's
    diagonal) that map the mesh's box onto itself, sides within `CUBE_SIDES` of each other: the
    basins a box a few per cent off a cube confuses (its faces look alike, and ICP from a start
    25° away may settle on a neighbouring face). A box whose sides differ has none."""
    turns = [
        t for t in CUBE_TURNS[4:] if np.allclose(np.abs(t) @ model.extent, model.extent, rtol=CUBE_SIDES)
    ]
    return _turned(pose, np.asarray(turns).reshape(-1, 3, 3), model.center)


def revolution_axes(model: PoseModel) -> list[int]:
    """The mesh axes about which the surface is nearly a body of revolution: turned 30° about the
    axis through `model.median`, at least `REVOLUTION_SHARE` of its samples stay within
    `REVOLUTION_GAP` of their RMS distance from the axis of the surface (a cup's body, a bottle,
    a plate; never a box's axis, nor a flat spatula's long one)."""
    points = model.surface[:: max(1, len(model.surface) // SURFACE_CHECK)] - model.median
    axes = []
    for k, axis in enumerate(np.eye(3)):
        turn = Rotation.from_rotvec(np.radians(30.0) * axis).as_matrix()
        gap, _ = model.tree.query(points @ turn.T + model.median)
        lateral = np.sqrt(np.mean((points**2).sum(axis=1) - (points @ axis) ** 2))
        if float(np.mean(gap < REVOLUTION_GAP * lateral)) >= REVOLUTION_SHARE:
            axes.append(k)
    return axes


def axis_sweeps(
    pose: Similarity, pivot: np.ndarray, axes: list[int], degrees: tuple[float, ...] = SWEEP_DEG
) -> list[Similarity]:
    """`pose` turned about each of the mesh `axes` through `pivot` by each of `degrees` (and its
    negative): the turns a body of revolution makes about its own axis, which move nothing but a
    handle or a spout; refinement, whose robust loss treats that small part's misfit as an
    outlier, can stall tens of degrees short of them."""
    turns = [
        Rotation.from_rotvec(np.radians(signed) * np.eye(3)[k]).as_matrix()
        for k in axes
        for angle in degrees
        for signed in (angle, -angle)
    ]
    return _turned(pose, np.asarray(turns).reshape(-1, 3, 3), pivot)


def sweep_starts(model: PoseModel, fits: list[tuple[float, Similarity]]) -> list[Similarity]:
    """`axis_sweeps` of the two best distinct answers among (score, pose) `fits` about the mesh's
    axes of revolution; none for a mesh without such an axis."""
    axes = revolution_axes(model)
    if not axes:
        return []
    answers = distinct_poses(sorted(fits, key=lambda f: -f[0]), 2, 25.0)
    return [start for answer in answers for start in axis_sweeps(answer, model.median, axes)]


def best_of(scored: list[tuple[float, Similarity]], count: int) -> list[Similarity]:
    """The poses of the `count` best-scoring (score, pose) pairs, best first."""
    return [pose for _, pose in sorted(scored, key=lambda f: -f[0])[: max(count, 0)]]


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
        # ... and a box a few per cent off a cube confuses its faces: its other cube turns, ranked
        # unrefined (a render each).
        turns = cube_turns(screened[0].pose, model)
        scored = [(score_pose(model, obs, pose).score, pose) for pose in turns]
        finalists += best_of(scored, opts.cube_turn_candidates)
        fits = [
            refine(model, obs, start, opts.refine_iterations, opts.depth_sigma, opts.silhouette_sigma_px)
            for start in finalists
        ]
        # Polish: a body of revolution's best answers turned about its axis, screened, the best
        # few finished (a cup's handle side, which refinement stalls short of).
        swept = [
            refine(model, obs, start, opts.screen_iterations, opts.depth_sigma, opts.silhouette_sigma_px)
            for start in sweep_starts(model, [(f.score, f.pose) for f in fits])
        ]
        fits += [
            refine(model, obs, start, opts.refine_iterations, opts.depth_sigma, opts.silhouette_sigma_px)
            for start in best_of([(f.score, f.pose) for f in swept], opts.sweep_candidates)
        ]
        best = max(fits, key=lambda f: f.score)
        if best.score < opts.min_score:
            raise PoseNotFound(f"best fit scores {best.score:.3f} < pose.min_score {opts.min_score}")
        rivals = [f.pose for f in fits + screened if distinct_answers(model, best.pose, f.pose)]
        margin = margin_against(model, obs, best.pose, rivals)
        return PoseResult(best.pose.matrix(), float(best.pose.scale), float(best.score), float(margin))
