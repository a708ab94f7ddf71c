"""Adapter over NVlabs FoundationPose's `register()` (DESIGN §4, "6D pose").

FoundationPose is not on PyPI and is CUDA-only (nvdiffrast, warp, a C++ extension); users run it
from its docker image, where its `estimater` module is importable. It does not estimate scale, so
the mesh is first made metric with our own calibration (the built-in estimator's scale), then
registered. Nothing here is imported unless `pose.backend = foundationpose`.
"""

from __future__ import annotations

import os

import numpy as np
import trimesh

from refany3d.config import PoseSettings, SettingsError
from refany3d.models.pose.base import PoseNotFound, PoseResult
from refany3d.models.pose.builtin import BuiltinPoseEstimator
from refany3d.models.pose.calibrate import similarity
from refany3d.models.pose.model import PoseModel
from refany3d.models.pose.observe import observe
from refany3d.models.pose.refine import score_pose


def _import_foundationpose():
    """FoundationPose's `estimater` module and nvdiffrast's torch API, or a SettingsError."""
    try:
        import estimater  # FoundationPose's own module name (sic), on sys.path in its image
        import nvdiffrast.torch as dr
    except ImportError as err:
        raise SettingsError(
            "pose.backend: 'foundationpose' needs NVlabs FoundationPose importable (its `estimater` "
            f"module and nvdiffrast; run inside its docker image) — {err}"
        ) from None
    return estimater, dr


class FoundationPoseEstimator:
    name = "foundationpose"
    needs_rgb = True

    def __init__(self, options: PoseSettings) -> None:
        if options.weights and not os.path.isdir(options.weights):
            raise SettingsError(f"pose.weights: {options.weights!r} is not a directory")
        self.options = options
        self._fp, dr = _import_foundationpose()
        self._glctx = dr.RasterizeCudaContext()
        self._scorer = self._fp.ScorePredictor()
        self._refiner = self._fp.PoseRefinePredictor()
        self._calibrator = BuiltinPoseEstimator(options)

    def estimate(
        self,
        mesh: trimesh.Trimesh,
        depth: np.ndarray,
        mask: np.ndarray,
        intrinsics: np.ndarray,
        rgb: np.ndarray | None = None,
    ) -> PoseResult:
        if rgb is None:
            raise PoseNotFound("foundationpose needs the RGB view")
        scale = self._calibrator.estimate(mesh, depth, mask, intrinsics).scale
        metric = mesh.copy()
        metric.apply_scale(scale)  # FoundationPose wants the mesh in metres, like the depth
        fp = self._fp.FoundationPose(
            model_pts=metric.vertices,
            model_normals=metric.vertex_normals,
            mesh=metric,
            scorer=self._scorer,
            refiner=self._refiner,
            glctx=self._glctx,
        )
        pose = fp.register(
            K=np.asarray(intrinsics, dtype=np.float64),
            rgb=np.asarray(rgb),
            depth=np.asarray(depth, dtype=np.float32),
            ob_mask=np.asarray(mask, dtype=bool),
            iteration=5,
        )
        pose = np.asarray(pose, dtype=np.float64).reshape(4, 4)
        if not np.isfinite(pose).all():
            raise PoseNotFound("foundationpose returned a non-finite pose")
        model = PoseModel(mesh)
        obs = observe(depth, mask, intrinsics)
        fit = score_pose(model, obs, similarity(pose, scale))
        return PoseResult(pose, float(scale), float(fit.score))
