"""A rendered asset and a 'perfect' generated sample of it: RGB + point map from one render."""

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from refany3d.config import RenderSettings
from refany3d.models.flux.components import tiny_tokenizer
from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.point_maps import normalize_point_map
from refany3d.render.sample import render_sample
from refany3d.synthetic.objects import OBJECTS, build_object

SIZE = 96


@pytest.fixture(scope="session")
def asset() -> trimesh.Trimesh:
    spec = next(s for s in OBJECTS if s.item == "toy robot")
    return build_object(spec, np.random.default_rng(0))


@pytest.fixture(scope="session")
def perfect(asset):
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


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer(bos=True)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    directory = tmp_path_factory.mktemp("dino")
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14
    )
    Dinov2Model(config).save_pretrained(directory)
    BitImageProcessor(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(directory)
    return directory
