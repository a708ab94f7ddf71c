import time

import numpy as np
import pytest

from refany3d.config import override
from refany3d.models.mesher import load_mesher
from refany3d.models.mesher.truth import CAMERA_TO_FRONT, signed_distance
from refany3d.render.mesh import normalize_mesh, repair_mesh
from refany3d.synthetic import read_truth
from refany3d.testing.views import synthetic_views


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    views, ctx, settings = synthetic_views(tmp_path_factory.mktemp("truth-mesher"), rows=1, size=96)
    return views, settings


def _generate(views, settings, **dotted):
    s = override(settings, **dotted)
    return load_mesher(s).generate([None] * len(views), views, s.mesher, 0, time.monotonic() + 600)


def test_truth_mesher_gives_a_new_surface_in_the_front_frame(views):
    samples, settings = views
    meshes = _generate(samples, settings, **{"mesher.truth_rotation_deg": 0.0})
    for sample, mesh in zip(samples, meshes, strict=True):
        truth = read_truth(sample.source_ref, sample.side)
        expected = repair_mesh(truth.mesh)
        expected.vertices = expected.vertices @ (CAMERA_TO_FRONT @ truth.pose[:3, :3]).T
        expected, _ = normalize_mesh(expected)
        assert mesh.is_watertight and np.abs(mesh.vertices).max() < 1.1
        # on the truth's surface (within two grid cells), yet none of its vertices
        near = np.abs(signed_distance(expected, np.asarray(mesh.vertices)))
        assert np.percentile(near, 95) < 2 * 2.0 / settings.mesher.truth_resolution
        shared = (np.abs(mesh.vertices[:, None] - expected.vertices[None]).max(-1) < 1e-9).any()
        assert not shared


def test_truth_mesher_rotation_error_moves_the_surface(views):
    samples, settings = views
    exact = _generate(samples, settings, **{"mesher.truth_rotation_deg": 0.0})
    turned = _generate(samples, settings, **{"mesher.truth_rotation_deg": 5.0})
    again = _generate(samples, settings, **{"mesher.truth_rotation_deg": 5.0})
    assert all(np.array_equal(a.vertices, b.vertices) for a, b in zip(turned, again, strict=True))
    assert all(len(a.vertices) != len(b.vertices) or not np.allclose(a.vertices, b.vertices)
               for a, b in zip(exact, turned, strict=True))  # fmt: skip
