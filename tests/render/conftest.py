import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from refany3d.synthetic.objects import OBJECTS, build_object


@pytest.fixture(scope="module")
def textured_object() -> trimesh.Trimesh:
    """A composite, asymmetric, textured object (the synthetic source's toy robot)."""
    spec = next(s for s in OBJECTS if s.item == "toy robot")
    return build_object(spec, np.random.default_rng(0))


def make_pose(euler_deg, translation) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("xyz", euler_deg, degrees=True).as_matrix()
    pose[:3, 3] = translation
    return pose
