"""The sampling pipeline on the embedded tiny default: sizes, files, seeds, bad assets, --lora."""

import json

import numpy as np
import pytest
import trimesh
from PIL import Image

from refany3d.config import SampleSettings, SettingsError, override
from refany3d.models.flux.io import save_adapters
from refany3d.sampling.assets import AssetError, load_asset, render_conditions
from refany3d.sampling.pipeline import RefAny3DPipeline, resolve_adapters

SETTINGS = override(
    SampleSettings(),
    **{
        "sampler.resolution": 48,
        "sampler.steps": 2,
        "render.resolution": 32,
        "render.views": 2,
        "model.num_views": 2,
    },
)


def _colored_box() -> trimesh.Trimesh:
    box = trimesh.creation.box((1.0, 2.0, 0.5))
    box.apply_translation((3.0, 1.0, -2.0))
    box.visual.vertex_colors = np.tile([200, 30, 30, 255], (len(box.vertices), 1))
    return box


@pytest.fixture(scope="module")
def pipe():
    return RefAny3DPipeline.from_pretrained(settings=SETTINGS)


@pytest.fixture(scope="module")
def asset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("asset") / "box.ply"
    _colored_box().export(path)
    return path


def test_pipeline_writes_image_and_point_map_of_the_requested_size(pipe, asset_file, tmp_path):
    out = pipe(asset_file, "a red box", seed=3)
    assert out.image.shape == (48, 48, 3) and out.image.dtype == np.uint8
    assert out.point_map.shape == (48, 48, 3) and 0.0 <= out.point_map.min() <= out.point_map.max() <= 1.0
    directory = out.save(tmp_path / "s", SETTINGS)
    assert Image.open(directory / "image.png").size == (48, 48)
    assert Image.open(directory / "point_map.png").size == (48, 48)
    sheet = Image.open(directory / "contact_sheet.png")
    assert sheet.size == (2 * 24 + 48 + 48, 48)  # two views at half size | RGB | point map
    meta = json.loads((directory / "sample.json").read_text())
    assert meta["prompt"] == "a red box" and meta["seed"] == 3 and "tiny" in meta["label"]
    assert len(list((directory / "views").glob("rgb_*.png"))) == 2
    again = out.save(tmp_path / "t", SETTINGS)  # byte-identical artifacts
    files = sorted(p.relative_to(directory) for p in directory.rglob("*") if p.is_file())
    assert all((directory / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_pipeline_seed_reproduces_an_image(pipe, asset_file):
    a, b, c = (
        pipe(asset_file, "a red box", seed=5),
        pipe(asset_file, "a red box", seed=5),
        pipe(asset_file, "a red box", seed=6),
    )
    assert np.array_equal(a.image, b.image) and np.array_equal(a.point_map, b.point_map)
    assert not np.array_equal(a.image, c.image)


def test_load_asset_normalises_into_the_unit_box(asset_file):
    mesh = load_asset(asset_file)
    lo, hi = mesh.bounds
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-9)
    assert np.abs(hi - lo).max() == pytest.approx(2.0)
    views = render_conditions(mesh, SETTINGS.render)
    assert len(views.rgb) == 2 and views.rgb[0].shape == (32, 32, 3)
    assert (views.point_maps[0] < 1).any(axis=-1).sum() > 50  # the object is in view


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (b"", ".glb", "empty file"),
        (b"not a mesh at all", ".glb", "unreadable"),
        (None, ".ply", "no faces"),
    ],
)
def test_load_asset_bad_files_raise_a_clear_error(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    if content is None:  # a point cloud: vertices, no triangles
        trimesh.PointCloud(np.random.default_rng(0).random((20, 3))).export(path)
    else:
        path.write_bytes(content)
    with pytest.raises(AssetError, match=message) as err:
        load_asset(path)
    assert str(path) in str(err.value)
    with pytest.raises(AssetError, match="no such file"):
        load_asset(tmp_path / "missing.obj")


def test_resolve_adapters_run_checkpoint_or_adapter_directory(pipe, tmp_path):
    adapters = save_adapters(pipe.components.transformer, tmp_path / "adapters")
    assert resolve_adapters(adapters) == (adapters, {})
    run = tmp_path / "run"
    for step in (100, 200):
        directory = run / "checkpoints" / f"step-{step:08d}"
        save_adapters(pipe.components.transformer, directory / "adapters")
        (directory / "manifest.json").write_text(json.dumps({"step": step, "base": "b"}))
    entries = [{"step": s, "position": 0, "dir": f"step-{s:08d}"} for s in (100, 200)]
    (run / "checkpoints" / "manifest.json").write_text(json.dumps({"checkpoints": entries}))
    newest = run / "checkpoints" / "step-00000200"
    assert resolve_adapters(run) == (newest / "adapters", {"step": 200, "base": "b"})
    assert resolve_adapters(run / "checkpoints" / "step-00000100")[1]["step"] == 100
    with pytest.raises(FileNotFoundError, match="--lora"):
        resolve_adapters(tmp_path / "empty")
    # a promotion pointer (scheduled retraining's promoted.json), or the directory holding it
    retrain = tmp_path / "retrain"
    retrain.mkdir()
    old = run / "checkpoints" / "step-00000100"
    (retrain / "promoted.json").write_text(json.dumps({"checkpoint": str(old), "version": "v-1"}))
    assert resolve_adapters(retrain / "promoted.json") == (old / "adapters", {"step": 100, "base": "b"})
    assert resolve_adapters(retrain)[0] == old / "adapters"
    (retrain / "promoted.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="promotion pointer"):
        resolve_adapters(retrain)


def test_from_pretrained_refuses_adapters_of_another_base(pipe, tmp_path):
    directory = tmp_path / "ckpt"
    save_adapters(pipe.components.transformer, directory / "adapters")
    (directory / "manifest.json").write_text(json.dumps({"step": 1, "base": "FLUX.1-dev from /models/flux"}))
    with pytest.raises(SettingsError, match="was trained on 'FLUX.1-dev from /models/flux'"):
        RefAny3DPipeline.from_pretrained(directory, settings=SETTINGS)


def test_from_pretrained_loads_the_trained_adapters(pipe, asset_file, tmp_path):
    import copy

    import torch

    trained = copy.deepcopy(pipe.components.transformer)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_adapters(trained, tmp_path / "adapters")
    loaded = RefAny3DPipeline.from_pretrained(tmp_path / "adapters", settings=SETTINGS)
    for a, b in zip(loaded.components.transformer.trainable_parameters(), trained.trainable_parameters()):
        assert torch.equal(a, b)
    assert not np.array_equal(
        loaded(asset_file, "a red box", seed=1).image, pipe(asset_file, "a red box", seed=1).image
    )


def test_pipeline_runs_from_a_flux_snapshot_directory(asset_file, tmp_path):
    from refany3d.models.flux.components import save_tiny_flux_snapshot

    snapshot = save_tiny_flux_snapshot(tmp_path / "flux")
    settings = override(SETTINGS, **{"model.pretrained": str(snapshot)})
    pipe = RefAny3DPipeline.from_pretrained(settings=settings)
    assert pipe.components.label.startswith("FLUX.1-dev from")
    assert pipe(asset_file, "a red box").image.shape == (48, 48, 3)


def test_image_guidance_blank_pass_sees_what_reference_dropout_trained_on(pipe, asset_file):
    import torch

    from refany3d.config import TrainSettings
    from refany3d.train.data import Item
    from refany3d.train.encode import dropout_encodings, flow_batch

    guided = RefAny3DPipeline(pipe.components, override(SETTINGS, **{"sampler.image_guidance": 2.0}))
    seen = []
    hook = pipe.components.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append((kwargs["cond_rgb"], kwargs["cond_point_map"])), with_kwargs=True
    )
    try:
        guided(asset_file, "a red box", seed=0)
    finally:
        hook.remove()
    assert len(seen) == 2 * SETTINGS.sampler.steps  # per step: with the references, then blank
    train = override(TrainSettings(), **{"data.condition_resolution": 32, "model.num_views": 2})
    drops = dropout_encodings(pipe.components, train)
    side = torch.zeros(4, 64)  # a 2x2 target grid; only the references matter here
    encodings = [{"target_rgb": side, "target_point_map": side, "text": drops["text"], "pooled": drops["pooled"],
                  "cond_rgb": torch.ones_like(drops["cond_rgb"]), "cond_point_map": torch.ones_like(drops["cond_rgb"])}]  # fmt: skip
    item = Item(0, "s", "k", drop_text=False, drop_references=True)
    trained = flow_batch(encodings, [item], drops, train, torch.device("cpu"), torch.float32)
    rgb, point_map = seen[1]
    assert not torch.equal(seen[0][0], rgb)  # the first pass had the real references
    assert torch.equal(rgb, trained.cond_rgb) and torch.equal(point_map, trained.cond_point_map)


def test_sample_of_an_asset_with_blank_views_exits_2_in_one_line(tmp_path, capsys):
    from refany3d.cli import main

    flat = tmp_path / "triangle.obj"
    trimesh.Trimesh([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False).export(flat)
    small = ["--set", "sampler.resolution=32", "--set", "render.resolution=32", "--steps", "1"]
    args = ["sample", "--asset", str(flat), "--prompt", "a sheet", "--out", str(tmp_path / "o"), *small]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the no --lora notice
    assert err.startswith(f"refany3d sample: error: asset {str(flat)!r}: orbit view(s) 2, 3, 4, 5, 6 of 8")
    assert "show nothing of it" in err and not (tmp_path / "o").exists()
