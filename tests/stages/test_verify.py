import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.spatial.transform import Rotation

from refany3d.config import SettingsError, override
from refany3d.records import MESH
from refany3d.render.mesh import load_mesh, mesh_to_glb
from refany3d.stages.verify import DEPTH_MISMATCH, HIGH_LPIPS, LOW_IOU, MISSING_POSE, POSE_AMBIGUOUS, verify
from refany3d.testing.posed import posed_samples


@pytest.fixture(scope="module")
def posed(tmp_path_factory):
    return posed_samples(tmp_path_factory.mktemp("verify"), rows=2, size=256)


def _tilted(sample, degrees: float):
    """The sample with its pose rotated by `degrees` about the object's x axis (through its centre)."""
    pose = np.asarray(sample.pose).reshape(4, 4).copy()
    pose[:3, :3] = pose[:3, :3] @ Rotation.from_euler("x", degrees, degrees=True).as_matrix()
    return sample.replace(pose=[float(v) for v in pose.ravel()])


def _grey_textured(sample, store):
    """The sample with its mesh's texture replaced by flat grey (same UVs, same geometry)."""
    mesh = load_mesh(store.get(sample.artifacts[MESH]), file_type="glb")
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=grey)
    mesh.visual = trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=material)
    out = sample.replace()
    out.artifacts[MESH] = store.put_content("mesh", mesh_to_glb(mesh), ".glb")
    return out


def test_verify_true_pose_keeps_every_sample_with_both_metrics(posed):
    samples, ctx, settings = posed
    result = verify(samples, settings, ctx)
    assert not result.dropped and len(result.kept) == len(samples)
    for s in result.kept:
        assert s.metrics["mask_iou"] > 0.97, s.sample_id
        assert 0.0 <= s.metrics["lpips"] < 0.15, s.sample_id
    again = verify(samples, settings, ctx)
    assert [s.metrics for s in again.kept] == [s.metrics for s in result.kept]


def test_verify_wrong_pose_drops_low_iou(posed):
    samples, ctx, settings = posed
    result = verify([_tilted(s, 60.0) for s in samples], settings, ctx)
    assert not result.kept
    assert [r.reason for r in result.dropped] == ["low_iou"] * len(samples) and LOW_IOU == "low_iou"
    assert all(r.stage == "verify" and r.metric < settings.verify.min_iou for r in result.dropped)


def _scaled_about_camera(sample, factor: float):
    """The sample at `factor` × its scale and distance: the same image, another depth."""
    pose = np.asarray(sample.pose).reshape(4, 4).copy()
    pose[:3, 3] *= factor
    return sample.replace(pose=[float(v) for v in pose.ravel()], mesh_scale=sample.mesh_scale * factor)


def test_verify_true_pose_records_depth_agreement(posed):
    samples, ctx, settings = posed
    for s in verify(samples, settings, ctx).kept:
        assert abs(s.metrics["depth_offset"]) < 0.01 and s.metrics["depth_inliers"] > 0.95, s.sample_id


@pytest.mark.parametrize("factor", [1.06, 0.92])
def test_verify_scale_and_distance_off_drops_depth_mismatch(posed, factor):
    """A silhouette cannot see a pose scaled about the camera (IoU stays ~1); the depth can."""
    samples, ctx, settings = posed
    result = verify([_scaled_about_camera(s, factor) for s in samples], settings, ctx)
    assert not result.kept
    assert [r.reason for r in result.dropped] == ["depth_mismatch"] * len(samples)
    assert DEPTH_MISMATCH == "depth_mismatch"
    assert all(abs(r.metric) > settings.verify.max_depth_offset for r in result.dropped)


def test_verify_small_pose_margin_drops_pose_ambiguous(posed):
    samples, ctx, settings = posed
    unsure = [s.replace(metrics={**s.metrics, "pose_margin": 0.004}) for s in samples]
    result = verify(unsure, settings, ctx)
    assert [r.reason for r in result.dropped] == ["pose_ambiguous"] * len(samples)
    assert POSE_AMBIGUOUS == "pose_ambiguous" and all(r.metric == 0.004 for r in result.dropped)
    sure = [s.replace(metrics={**s.metrics, "pose_margin": 0.3}) for s in samples]
    assert len(verify(sure, settings, ctx).kept) == len(samples)


def test_verify_wrong_texture_drops_high_lpips(posed):
    samples, ctx, settings = posed
    result = verify([_grey_textured(s, ctx.store) for s in samples], settings, ctx)
    assert not result.kept
    assert [r.reason for r in result.dropped] == ["high_lpips"] * len(samples)
    assert HIGH_LPIPS == "high_lpips"
    assert all(r.metric >= settings.verify.max_lpips for r in result.dropped)


def test_verify_sample_without_pose_drops_missing_pose(posed):
    samples, ctx, settings = posed
    result = verify([samples[0].replace(pose=None, mesh_scale=None)], settings, ctx)
    assert [r.reason for r in result.dropped] == ["missing_pose"] and MISSING_POSE == "missing_pose"
    assert "pose" in result.dropped[0].detail and "mesh_scale" in result.dropped[0].detail
    no_depth = samples[0].replace(artifacts={k: v for k, v in samples[0].artifacts.items() if k != "depth"})
    dropped = verify([no_depth], settings, ctx).dropped
    assert [r.reason for r in dropped] == ["missing_pose"] and "depth" in dropped[0].detail


def test_verify_missing_lpips_weights_fails_before_any_sample(posed, tmp_path):
    samples, ctx, settings = posed
    settings = override(settings, **{"verify.lpips_weights": str(tmp_path / "absent.safetensors")})
    with pytest.raises(SettingsError, match=r"^verify\.lpips_weights="):
        verify([samples[0].replace(artifacts={})], settings, ctx)  # no sample is read first


@pytest.mark.slow
def test_verify_keeps_samples_posed_by_the_pose_stage(posed):
    """The real chain: the pose stage estimates pose and scale from depth (with a 7 % scale error,
    as a depth network errs), then verify and render run on its output."""
    import io

    from refany3d.records import DEPTH
    from refany3d.stages.pose import pose
    from refany3d.stages.render import render
    from refany3d.synthetic import read_truth

    samples, ctx, settings = posed
    unposed = []
    for s in samples:
        buf = io.BytesIO()
        np.savez(buf, depth=(read_truth(s.source_ref, s.side).depth * 1.07).astype(np.float16))
        out = s.replace(pose=None, mesh_scale=None)
        out.artifacts[DEPTH] = ctx.store.put_content("depth", buf.getvalue(), ".npz")
        unposed.append(out)
    posed_by_stage = pose(unposed, settings, ctx).kept
    assert len(posed_by_stage) == len(samples)
    result = verify(posed_by_stage, settings, ctx)
    assert not result.dropped, [(r.reason, r.metric) for r in result.dropped]
    assert all(s.metrics["mask_iou"] > 0.9 and s.metrics["lpips"] < 0.2 for s in result.kept)
    assert len(render(result.kept, settings, ctx).kept) == len(samples)
