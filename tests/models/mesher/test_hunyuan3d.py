import threading
import time

import numpy as np
import pytest
from PIL import Image

from refany3d.config import BuildSettings, SettingsError, override
from refany3d.models.mesher import MesherTimeout, load_mesher
from refany3d.models.mesher.hunyuan3d import Hunyuan3DMesher
from refany3d.models.weights import WeightsError, check_mesher_weights, resolve_hunyuan3d
from refany3d.records import Sample
from refany3d.testing.hunyuan3d import ShapeField, save_hunyuan3d, sphere_sdf, tiny_config

OCTREE = 32  # 33³ volume queries: seconds on the CPU


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan3d")
    save_hunyuan3d(root, tiny_config("standard"), "standard")
    save_hunyuan3d(root, tiny_config("turbo"), "turbo", seed=1)
    return root


def _settings(weights, **dotted):
    base = {
        "mesher.backend": "hunyuan3d",
        "mesher.weights": str(weights),
        "mesher.octree_resolution": OCTREE,
        "mesher.steps": 2,
    }
    return override(BuildSettings(), **{**base, **dotted})


def _cutouts(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        rgba = np.zeros((96, 96, 4), np.uint8)
        rgba[20 + 5 * i : 70, 30:80] = (200, 60 + 40 * i, 50, 255)  # the object, alpha 255
        out.append(Image.fromarray(rgba, "RGBA"))
    return out


def _samples(n: int) -> list[Sample]:
    return [Sample(f"s{i}", f"s{i}", "subjects200k", f"x.parquet#{i}") for i in range(n)]


def _mesher(settings) -> Hunyuan3DMesher:
    m = settings.mesher
    return Hunyuan3DMesher(m.weights, dit=m.dit, flashvdm=m.flashvdm, mc_algo=m.mc_algo)


@pytest.mark.parametrize(
    "dotted",
    [{"mesher.dit": "standard"}, {"mesher.dit": "turbo", "mesher.steps": 0, "mesher.flashvdm": True}],
    ids=["standard", "turbo-flashvdm"],
)
def test_hunyuan3d_generate_extracts_the_decoded_surface(weights, dotted):
    settings = _settings(weights, **dotted)
    mesher = _mesher(settings)
    ShapeField.install(mesher.pipe.vae, sphere_sdf(0.6))  # this instance only: the DiT and decoder still run
    meshes = mesher.generate(_cutouts(2), _samples(2), settings.mesher, 0, time.monotonic() + 300)
    for m in meshes:
        assert m is not None and m.is_watertight
        radius = np.linalg.norm(m.vertices, axis=1)
        assert np.allclose(radius, 0.6, atol=2.5 * 2.02 / OCTREE)


def test_hunyuan3d_generate_without_surface_gives_none(weights):
    settings = _settings(weights)
    mesher = _mesher(settings)
    ShapeField.install(mesher.pipe.vae, lambda p: p[..., 0] * 0 - 1)  # empty everywhere
    assert mesher.generate(_cutouts(1), _samples(1), settings.mesher, 0, time.monotonic() + 300) == [None]


def test_hunyuan3d_batching_keeps_each_objects_result(weights):
    settings = _settings(weights)
    mesher = load_mesher(settings)
    latents = mesher.denoise(_cutouts(2), _samples(2), settings.mesher, 0, time.monotonic() + 300)
    alone = mesher.denoise(_cutouts(2)[1:], _samples(2)[1:], settings.mesher, 0, time.monotonic() + 300)
    assert np.allclose(latents[1].numpy(), alone[0].numpy(), atol=1e-5)
    assert not np.allclose(latents[0].numpy(), latents[1].numpy())


def test_hunyuan3d_generates_one_batch_at_a_time_from_two_threads(weights):
    """Two mesh tasks of a thread-runner build share the instance; its pipeline keeps per-call
    state (the scheduler's step index), so their generations must not interleave, on the CPU too."""
    settings = _settings(weights)
    mesher = _mesher(settings)
    denoise, inside, most = mesher.denoise, [0], [0]

    def counted(*args):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)  # a window in which a second generation would enter
        try:
            return denoise(*args)
        finally:
            inside[0] -= 1

    mesher.denoise = counted
    alone = mesher.generate(_cutouts(1), _samples(1), settings.mesher, 0, time.monotonic() + 300)
    out = [None, None]

    def run(i):
        out[i] = mesher.generate(_cutouts(1), _samples(1), settings.mesher, 0, time.monotonic() + 300)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert most[0] == 1
    for meshes in out:
        assert np.array_equal(meshes[0].vertices, alone[0].vertices)


def test_hunyuan3d_generate_past_deadline_raises_timeout(weights):
    settings = _settings(weights)
    with pytest.raises(MesherTimeout):
        load_mesher(settings).generate(_cutouts(1), _samples(1), settings.mesher, 0, time.monotonic())


def test_load_mesher_caches_per_weights_and_variant(weights):
    assert load_mesher(_settings(weights)) is load_mesher(_settings(weights))
    turbo = load_mesher(_settings(weights, **{"mesher.dit": "turbo"}))
    assert turbo is not load_mesher(_settings(weights)) and turbo.pipe.model.guidance_embed


def test_hunyuan3d_dmc_without_cuda_is_a_settings_error(weights):
    with pytest.raises(SettingsError, match="mesher.mc_algo"):
        _mesher(_settings(weights, **{"mesher.mc_algo": "dmc"}))


def test_check_mesher_weights_names_the_setting_and_layout(tmp_path, weights):
    settings = _settings(tmp_path / "nowhere", **{"source.kind": "subjects200k"})
    with pytest.raises(WeightsError, match=r"mesher.weights.*hunyuan3d-dit-v2-0/config.yaml"):
        check_mesher_weights(settings)
    partial = tmp_path / "partial"
    (partial / "hunyuan3d-dit-v2-0").mkdir(parents=True)
    (partial / "hunyuan3d-dit-v2-0" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(WeightsError, match=r"lacks model.fp16.safetensors"):
        resolve_hunyuan3d(str(partial), "standard")
    with pytest.raises(WeightsError, match="mesher.weights is empty"):
        resolve_hunyuan3d("", "turbo")
    assert resolve_hunyuan3d(str(weights), "turbo") == weights.resolve()
    check_mesher_weights(override(settings, **{"mesher.weights": str(weights)}))


def test_check_mesher_weights_rejects_a_downloading_config(tmp_path, weights):
    import shutil

    import yaml

    copy = tmp_path / "copy"
    shutil.copytree(weights, copy)
    config = copy / "hunyuan3d-dit-v2-0" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    kwargs = data["conditioner"]["params"]["main_image_encoder"]["kwargs"]
    kwargs["version"] = "facebook/dinov2-giant"
    del kwargs["config"]
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsError, match="download"):
        resolve_hunyuan3d(str(copy), "standard")


@pytest.mark.slow
def test_hunyuan3d_flashvdm_refines_near_the_surface(weights):
    # octree 128: FlashVDM decodes a 64³ grid, then only the band around its surface at 128³
    settings = _settings(
        weights,
        **{
            "mesher.dit": "turbo",
            "mesher.steps": 0,
            "mesher.flashvdm": True,
            "mesher.octree_resolution": 128,
        },
    )
    mesher = _mesher(settings)
    decoder = ShapeField.install(mesher.pipe.vae, sphere_sdf(0.6)).decoder
    counted = decoder.count
    (mesh,) = mesher.generate(_cutouts(1), _samples(1), settings.mesher, 0, time.monotonic() + 300)
    assert mesh is not None and mesh.is_watertight
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - 0.6).max() < 4 * 2.02 / 128
    assert decoder.count - counted < 0.25 * 129**3  # far fewer queries than the dense grid


def test_surface_algorithm_auto_picks_torch_on_cuda_without_diso(monkeypatch):
    import importlib.util

    from refany3d.models.mesher.hunyuan3d import surface_algorithm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "diso" else real(n))
    assert surface_algorithm("auto", "cuda") == "torch"
    assert surface_algorithm("auto", "cpu") == "mc"
    assert surface_algorithm("torch", "cpu") == "torch"


@pytest.mark.parametrize("flashvdm", [False, True], ids=["dense", "flashvdm"])
def test_hunyuan3d_torch_surface_equals_skimages(weights, flashvdm):
    # same grid, both extractors: the same closed, outward surface through export_to_trimesh
    settings = _settings(weights, **{"mesher.flashvdm": flashvdm, "mesher.octree_resolution": 64})
    mesher = _mesher(settings)
    ShapeField.install(mesher.pipe.vae, sphere_sdf(0.5))
    latent = mesher.denoise(_cutouts(1), _samples(1), settings.mesher, 0, float("inf"))
    meshes = {}
    for algo in ("mc", "torch"):
        mesher.configure_decoder(flashvdm, algo)
        meshes[algo] = mesher.decode(latent[:1], settings.mesher)
    ours, ref = meshes["torch"], meshes["mc"]
    assert ours.is_watertight and ours.is_winding_consistent
    assert ours.volume == pytest.approx(ref.volume, rel=5e-3) and ours.volume > 0
    cells = 63 if flashvdm else 64  # FlashVDM rounds octree 64 down to a 64-point grid
    shrink = (cells / 65) ** 3  # hy3dgen's mc maps index / (octree + 1) into the box: kept as is
    assert ours.volume == pytest.approx(4 / 3 * np.pi * 0.5**3 * shrink, rel=0.01)
    np.testing.assert_allclose(
        np.unique(np.round(ours.vertices, 4), axis=0), np.unique(np.round(ref.vertices, 4), axis=0),
        atol=1e-4,
    )  # fmt: skip


def test_hunyuan3d_compile_keeps_the_output_without_recompiling_per_chunk(weights):
    # dynamo traces the DiT and the decoder block (the eager backend: no C++ build on the CPU);
    # 36 chunks of 1000 queries must not recompile per chunk (hy3dgen's decoder counts queries
    # in an int attribute, which would), so hitting the recompile limit fails the test
    import torch

    settings = _settings(weights, **{"mesher.num_chunks": 1000})
    eager = _mesher(settings)
    compiled = _mesher(settings)
    compiled.compile(backend="eager")
    args = (_cutouts(1), _samples(1), settings.mesher, 0, float("inf"))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=4):
        a, b = eager.denoise(*args), compiled.denoise(*args)
        ma, mb = eager.decode(a[:1], settings.mesher), compiled.decode(b[:1], settings.mesher)
    np.testing.assert_allclose(a.float().numpy(), b.float().numpy(), atol=1e-5)
    assert ma is not None and mb is not None
    np.testing.assert_allclose(ma.vertices, mb.vertices, atol=1e-4)


def test_hunyuan3d_torch_surface_of_a_flashvdm_band_is_one_closed_shell(weights):
    # two levels (63 -> 126 cells): the finest grid is NaN away from the band; skimage treats NaN
    # as outside and adds an inner shell where the band meets the NaN interior, ours skips it
    settings = _settings(weights, **{"mesher.flashvdm": True, "mesher.octree_resolution": 128})
    mesher = _mesher(settings)
    ShapeField.install(mesher.pipe.vae, sphere_sdf(0.5))
    mesher.configure_decoder(True, "torch")
    latent = mesher.denoise(_cutouts(1), _samples(1), settings.mesher, 0, float("inf"))
    mesh = mesher.decode(latent[:1], settings.mesher)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert len(mesh.split(only_watertight=False)) == 1
    shrink = (126 / 129) ** 3
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.5**3 * shrink, rel=0.01)


def test_dense_volume_decoder_gives_hy3dgens_grid(weights):
    # the grid made on the device, chunk by chunk with a padded last chunk, is hy3dgen's
    # meshgrid-on-the-CPU grid: the real decoder's logits are the same (37³ queries, chunks of 1000)
    import torch
    from hy3dgen.shapegen.models.autoencoders import VanillaVolumeDecoder

    from refany3d.models.mesher.dense_volume import DenseVolumeDecoder

    vae = _mesher(_settings(weights)).pipe.vae
    shapes = []

    def decoder(queries, latents):
        shapes.append(tuple(queries.shape))
        return vae.geo_decoder(queries=queries, latents=latents)

    latents = vae(torch.randn(2, *vae.latent_shape, generator=torch.Generator().manual_seed(0)))
    kwargs = dict(bounds=1.01, num_chunks=1000, octree_resolution=36)
    with torch.inference_mode():
        ours = DenseVolumeDecoder()(latents, decoder, **kwargs)
        ref = VanillaVolumeDecoder()(latents, vae.geo_decoder, enable_pbar=False, **kwargs)
    assert ours.shape == ref.shape == (2, 37, 37, 37) and ours.dtype == ref.dtype
    assert ref.std() > 0.01  # the logits vary over the grid: a wrong point order would show
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert set(shapes) == {(2, 1000, 3)} and len(shapes) == 51  # every chunk full, the last padded
    shapes.clear()
    with torch.inference_mode():
        small = DenseVolumeDecoder()(latents, decoder, **{**kwargs, "num_chunks": 10**6})
    assert shapes == [(2, 37**3, 3)]  # a grid smaller than a chunk is one unpadded chunk
    torch.testing.assert_close(small, ref, rtol=0, atol=1e-6)
