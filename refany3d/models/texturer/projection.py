"""`projection` texturer: the photo projected from the fitted front camera (refany3d.render.texture)."""

from __future__ import annotations

import numpy as np
import trimesh

from refany3d.config import TexturerSettings
from refany3d.models.texturer.base import Texturing
from refany3d.render.texture import fit_front_camera, project_texture


class ProjectionTexturer:
    name = "projection"

    def texture(
        self,
        mesh: trimesh.Trimesh,
        image: np.ndarray,
        mask: np.ndarray,
        atlas_size: int,
        options: TexturerSettings,
    ) -> Texturing:
        camera = fit_front_camera(mesh, mask, options.fov_deg, options.fit_resolution, options.fit_iterations)
        textured, seen = project_texture(mesh, image, mask, camera, atlas_size)
        return Texturing(textured, camera.pose, camera.intrinsics, camera.iou, seen)
