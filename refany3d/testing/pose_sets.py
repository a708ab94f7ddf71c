"""Pose cases shared by the pose tests: the synthetic source's views and meshes built here from
trimesh primitives (none of them the synthetic source's objects)."""

from __future__ import annotations

import numpy as np
import trimesh

from refany3d.testing.pose_cases import (
    REALISTIC,
    Perturbation,
    PoseCase,
    PoseErrors,
    default_intrinsics,
    make_case,
    mesher_surface,
    perturb_view,
    pose_errors,
    random_view,
)

SIZE = 512
ADD_S_MAX = 0.02  # of the object's diameter (issue 13's target)
SCALE_MAX = 0.03


def synthetic_source_cases(
    root: str, rows: int, seed: int, perturb: Perturbation = REALISTIC
) -> list[PoseCase]:
    """Both views of `rows` rows of the synthetic source, perturbed like its `truth` backends."""
    import pyarrow.parquet as pq

    from refany3d.synthetic import generate, read_truth

    generate(root, rows, seed, view_size=SIZE, progress=False)
    url = f"{root}/data/synthetic-00000.parquet"
    items = [d["item"] for d in pq.read_table(url, columns=["description"]).column(0).to_pylist()]
    cases = []
    for row in range(rows):
        surface = None
        for side in ("left", "right"):
            truth = read_truth(f"{url}#{row}", side)
            surface = surface or (mesher_surface(truth.mesh) if perturb.mesher else None)
            rng = np.random.default_rng([seed, row, side == "left"])
            cases.append(
                perturb_view(
                    f"{items[row]}-{row}{side[0]}", truth.mesh, truth.pose, truth.intrinsics, truth.mask,
                    truth.depth, perturb, rng, surface,
                )
            )  # fmt: skip
    return cases


def _at(mesh: trimesh.Trimesh, xyz=(0.0, 0.0, 0.0), rot_deg=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    out = mesh.copy()
    turn = trimesh.transformations.euler_matrix(*np.radians(rot_deg))
    turn[:3, 3] = xyz
    out.apply_transform(turn)
    return out


def _composite(*parts: trimesh.Trimesh) -> trimesh.Trimesh:
    return trimesh.util.concatenate(list(parts))


def primitive_meshes() -> dict[str, trimesh.Trimesh]:
    """Asymmetric meshes in metres, 5 cm to 2 m across, from trimesh primitives and composites."""
    box, cyl, sph = trimesh.creation.box, trimesh.creation.cylinder, trimesh.creation.icosphere
    return {
        "eraser-5cm": box([0.05, 0.022, 0.012]),
        "l-bracket-12cm": _composite(box([0.12, 0.02, 0.04]), _at(box([0.02, 0.08, 0.04]), (0.05, 0.05, 0))),
        "hammer-30cm": _composite(
            cyl(0.012, 0.3, sections=24), _at(box([0.1, 0.035, 0.035]), (0.03, 0, 0.15))
        ),
        "mug-like-11cm": _composite(
            cyl(0.04, 0.1, sections=32), _at(trimesh.creation.torus(0.028, 0.007), (0.05, 0, 0), (90, 0, 0))
        ),
        "snowman-40cm": _composite(sph(2, 0.12), _at(sph(2, 0.08), (0, 0.17, 0)), _at(cyl(0.01, 0.1), (0.09, 0.17, 0), (0, 90, 0))),
        "stool-60cm": _composite(
            _at(cyl(0.18, 0.04), (0, 0.6, 0), (90, 0, 0)),
            *[_at(cyl(0.015, 0.6), (0.12 * np.cos(a), 0.3, 0.12 * np.sin(a)), (90, 0, 0)) for a in (0.3, 2.2, 4.0)],
            _at(box([0.25, 0.03, 0.03]), (0.05, 0.2, 0.08)),
        ),
        "cone-arrow-1m": _composite(
            _at(trimesh.creation.cone(0.12, 0.3), (0, 0, 0.5)), _at(cyl(0.04, 1.0), (0, 0, 0)),
            _at(box([0.25, 0.02, 0.15]), (0, 0, -0.45)),
        ),
        "cabinet-2m": _composite(
            box([0.8, 2.0, 0.5]), _at(box([0.7, 0.4, 0.1]), (0, -0.7, 0.3)), _at(cyl(0.02, 0.3), (0.3, 0.3, 0.27))
        ),
        "capsule-tee-25cm": _composite(
            trimesh.creation.capsule(0.18, 0.03), _at(box([0.12, 0.03, 0.03]), (0.06, 0, 0.08))
        ),
        "stairs-70cm": _composite(*[_at(box([0.7, 0.18 * (i + 1), 0.25]), (0, 0.09 * (i + 1), 0.25 * i)) for i in range(3)]),
        # near-symmetric: a brick whose only tell is a small label on one end of its top, a
        # shape-sorter box a few per cent off a cube with one knob
        "brick-21cm": _composite(box([0.215, 0.1025, 0.065]), _at(box([0.05, 0.04, 0.008]), (0.07, 0.0, 0.036))),
        "sorter-box-15cm": _composite(box([0.15, 0.145, 0.14]), _at(cyl(0.012, 0.03), (0.04, 0.04, 0.08))),
        "cup-handle-9cm": _composite(
            cyl(0.035, 0.09, sections=32), _at(trimesh.creation.torus(0.025, 0.006), (0.04, 0, 0.005), (90, 0, 0))
        ),
        "plate-26cm": _composite(cyl(0.13, 0.012, sections=48), _at(cyl(0.06, 0.01, sections=32), (0, 0, -0.008))),
        "spatula-32cm": _composite(box([0.22, 0.024, 0.008]), _at(box([0.1, 0.07, 0.005]), (0.15, 0, 0.0))),
        "bottle-30cm": _composite(
            cyl(0.04, 0.22, sections=32), _at(trimesh.creation.cone(0.04, 0.06, sections=32), (0, 0, 0.11)),
            _at(cyl(0.013, 0.05, sections=16), (0, 0, 0.18)),
        ),
    }  # fmt: skip


def primitive_cases(
    views: int, seed: int, perturb: Perturbation = REALISTIC, names: tuple[str, ...] = ()
) -> list[PoseCase]:
    """`views` random views of every primitive mesh (or of those in `names`: the same cases as in
    the full set), any rotation, perturbed like the `truth` backends (by default), the estimator
    given the mesher's surface (when `perturb.mesher`)."""
    cases = []
    for index, (name, mesh) in enumerate(primitive_meshes().items()):
        if names and name not in names:
            continue
        surface = mesher_surface(mesh) if perturb.mesher else None
        for view in range(views):
            rng = np.random.default_rng([seed, index, view])
            k = default_intrinsics(rng, SIZE)
            pose = random_view(rng, mesh, k, SIZE)
            cases.append(make_case(f"{name}-v{view}", mesh, pose, k, SIZE, perturb, rng, surface))
    return cases


def passes(errors: PoseErrors) -> bool:
    return errors.add_s < ADD_S_MAX and errors.scale < SCALE_MAX


def report(cases: list[PoseCase], results) -> list[PoseErrors]:
    """Per-sample errors (printed: pytest -s shows them, a failure's report includes them)."""
    errors = []
    for case, result in zip(cases, results, strict=True):
        e = pose_errors(case, result.pose, result.scale)
        errors.append(e)
        flag = "" if passes(e) else "  <-- FAIL"
        print(
            f"{case.name:22s} rot {e.rotation_deg:7.2f} deg  ADD-S {100 * e.add_s:5.2f} %  "
            f"ADD {100 * e.add:6.2f} %  scale {100 * e.scale:5.2f} %  score {result.score:.3f}{flag}"
        )
    return errors


def verdict(case: PoseCase, pose: np.ndarray, scale: float, margin: float | None, opts=None):
    """The verify stage's geometric decision on an estimate of `case`: None (kept) or (reason,
    metric, detail) — silhouette IoU by exact ray casting, the estimator's margin, depth agreement."""
    from refany3d.config import VerifySettings
    from refany3d.models.pose.calibrate import similarity
    from refany3d.models.pose.consistency import depth_consistency
    from refany3d.models.pose.model import PoseModel
    from refany3d.render.raycast import raycast_maps
    from refany3d.stages.verify import geometric_rejection

    opts = opts or VerifySettings()
    height, width = case.mask.shape
    rigid = np.asarray(pose, dtype=np.float64).copy()
    rigid[:3, 3] /= scale  # the canonical mesh at [R | t / s] has the same image
    rendered = raycast_maps(case.mesh, rigid, case.intrinsics, width, height)["mask"]
    iou = float((rendered & case.mask).sum() / max((rendered | case.mask).sum(), 1))
    depth = depth_consistency(
        PoseModel(case.mesh), similarity(pose, scale), case.depth, case.mask, case.intrinsics,
        tolerance=opts.depth_tolerance,
    )  # fmt: skip
    return geometric_rejection(iou, margin, depth, opts)


def scaled_about_camera(pose: np.ndarray, scale: float, factor: float) -> tuple[np.ndarray, float]:
    """The same image at `factor` × the scale and distance: what a silhouette cannot tell apart."""
    out = np.asarray(pose, dtype=np.float64).copy()
    out[:3, 3] *= factor
    return out, scale * factor


def flipped(case: PoseCase, pose: np.ndarray, scale: float) -> np.ndarray | None:
    """`pose` turned half a turn about the mesh axis that moves its surface most (a look-alike
    face of a near-symmetric shape), or None when every half-turn is a symmetry of the shape."""
    from refany3d.models.pose.model import PoseModel

    model = PoseModel(case.mesh)
    best, moved = None, 0.04 * model.radius  # ADD-S 2 % of the diameter
    for axis in np.eye(3):
        turn = 2.0 * np.outer(axis, axis) - np.eye(3)
        distance = model.surface_distance(turn, 500)
        if distance > moved:
            best, moved = turn, distance
    if best is None:
        return None
    out = np.asarray(pose, dtype=np.float64).copy()
    centre = scale * out[:3, :3] @ model.center  # the box centre stays where it is
    out[:3, :3] = out[:3, :3] @ best
    out[:3, 3] += centre - scale * out[:3, :3] @ model.center
    return out
