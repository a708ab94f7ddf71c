import pytest
import torch

from refany3d.models._device_lock import DEVICE_LOCK, holds_device_lock
from refany3d.models._torch import accelerate, compile_layers


class _Backend:
    compile_layers = frozenset({"Linear"})
    graph_modules = frozenset({"0"})

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _compiled(model: torch.nn.Module) -> list[bool]:
    return [m._compiled_call_impl is not None for m in model]


def test_accelerate_cpu_backend_stays_eager():
    backend = accelerate(_Backend("cpu"), compile=True, cuda_graphs=True)
    assert _compiled(backend.model) == [False, False, False]
    assert "forward" not in vars(backend.model[0])  # not graphed


def test_compile_layers_compiles_named_classes_only():
    model = _Backend("cpu").model
    x = torch.randn(3, 4)
    plain = model(x)
    assert compile_layers(model, frozenset({"Linear"}), backend="aot_eager") == 2
    assert _compiled(model) == [True, False, True]
    torch.testing.assert_close(model(x), plain)


def test_compile_layers_no_matching_layer_raises():
    with pytest.raises(ValueError, match="no \\['Dinov2Layer'\\] layer"):
        compile_layers(_Backend("cpu").model, frozenset({"Dinov2Layer"}))


class _Locking:
    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    @holds_device_lock
    def run(self) -> bool:
        return DEVICE_LOCK._is_owned()


def test_cuda_backend_methods_hold_the_device_lock_cpu_ones_do_not():
    """A CUDA backend's call waits while another thread holds the lock; a CPU backend's does not."""
    import threading

    assert _Locking("cuda").run() and not _Locking("cpu").run()
    held, release, done = threading.Event(), threading.Event(), []

    def hold():
        with DEVICE_LOCK:
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    cuda_call = threading.Thread(target=lambda: done.append(_Locking("cuda").run()))
    cuda_call.start()
    cuda_call.join(0.3)
    assert cuda_call.is_alive() and not done  # waiting for the lock
    assert _Locking("cpu").run() is False  # not waiting
    release.set()
    cuda_call.join(5)
    holder.join(5)
    assert done == [True]
