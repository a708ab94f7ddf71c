"""Small training shards in the final shard schema, rendered from the synthetic objects.

Each row is one object at a random pose: `image` (object RGB on white at that pose), `point_map`
(its canonical point map, DESIGN §5 encoding), N orbit views of RGB + point map (`render_sample`),
a caption and the mesh (GLB, for held-out evaluation); written with the real shard writer. Rendering runs once per session (cached on disk).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from refany3d.config import RenderSettings
from refany3d.records import image_cell
from refany3d.storage.shards import write_shard

COLUMNS = [
    "sample_id",
    "source",
    "source_id",
    "side",
    "image",
    "caption",
    "point_map",
    "views_rgb",
    "views_point_map",
    "mesh_glb",
]


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def rendered_rows(n: int, size: int = 32, views: int = 2, seed: int = 0) -> list[dict]:
    """`n` shard rows of distinct synthetic objects rendered at `size` px with `views` orbit views."""
    from refany3d.render.cameras import intrinsics_from_fov
    from refany3d.render.mesh import mesh_to_glb
    from refany3d.render.point_maps import encode_point_map
    from refany3d.render.sample import render_sample
    from refany3d.synthetic.build import _random_pose
    from refany3d.synthetic.objects import OBJECTS, build_object

    settings = RenderSettings(resolution=size, views=views)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        spec = OBJECTS[i % len(OBJECTS)]
        mesh = build_object(spec, rng)
        k = intrinsics_from_fov(45.0, size, size)
        pose = _random_pose(rng, mesh, k, size)
        r = render_sample(mesh, pose, k, size, size, settings)
        lo, hi = mesh.bounds
        image = np.where(r.object_mask[..., None], r.object_rgb, 255).astype(np.uint8)
        pm, _ = encode_point_map(r.scene_point_map, r.scene_mask, lo, hi)
        view_pms = [encode_point_map(p, m, lo, hi)[0] for p, m in zip(r.orbit_point_maps, r.orbit_masks)]
        rows.append(
            {
                "sample_id": f"train-{seed}-{i:04d}",
                "source": "synthetic",
                "source_id": f"row-{i}",
                "side": "left",
                "image": image_cell(_png(image)),
                "caption": f"A {spec.item} on a white background.",
                "point_map": image_cell(pm),
                "views_rgb": [image_cell(_png(v)) for v in r.orbit_rgb],
                "views_point_map": [image_cell(p) for p in view_pms],
                "mesh_glb": mesh_to_glb(mesh),
            }
        )
    return rows


def write_dataset(root: Path, rows: list[dict], shard_size: int = 64) -> Path:
    """Rows as a build directory `root/data/*.parquet` (the layout `refany3d build` writes)."""
    for i in range(0, len(rows), shard_size):
        write_shard(str(root), "train-fixture", rows[i : i + shard_size], COLUMNS)
    return root
