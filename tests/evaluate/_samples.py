"""A rendered asset and a 'perfect' generated sample of it (RGB + point map from one render)."""

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

from refany3d.config import RenderSettings
from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.point_maps import normalize_point_map
from refany3d.render.sample import render_sample
from refany3d.synthetic.objects import OBJECTS, build_object

SIZE = 96


def make_asset() -> trimesh.Trimesh:
    spec = next(s for s in OBJECTS if s.item == "toy robot")
    return build_object(spec, np.random.default_rng(0))


def make_perfect(asset: trimesh.Trimesh):
    """(rgb (S, S, 3) uint8 on a grey background, point map (S, S, 3) in [0, 1], object mask)."""
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("xyz", [20, -35, 5], degrees=True).as_matrix()
    lo, hi = asset.bounds
    pose[:3, 3] = -pose[:3, :3] @ ((lo + hi) / 2) + [0, 0, 2.2 * np.linalg.norm(hi - lo)]
    k = intrinsics_from_fov(35, SIZE, SIZE)
    renders = render_sample(asset, pose, k, SIZE, SIZE, RenderSettings(resolution=16, views=1))
    mask = renders.object_mask
    rgb = np.where(mask[..., None], renders.object_rgb, np.uint8(110))
    pm = normalize_point_map(renders.scene_point_map, mask, lo, hi)
    return rgb, pm, mask


def write_samples(root, asset, perfect):
    """Two sample directories in `refany3d sample`'s layout: a perfect one and a wrong-texture one."""
    from refany3d.sampling.assets import ConditionViews
    from refany3d.sampling.pipeline import SampleOutput

    rgb, pm, mask = perfect
    views = ConditionViews(rgb=[rgb, rgb[:, ::-1].copy()], point_maps=[pm, pm], poses=[np.eye(4)] * 2)
    wrong = np.where(mask[..., None], 255 - rgb, rgb)
    for name, image in (("a-perfect", rgb), ("b-wrong", wrong)):
        SampleOutput((image,), (pm,), views, asset, ("a toy robot",), 0, "test").save(root / name)
    return root
