import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from refany3d.models._cuda_graphs import GraphedForward, _signature, graph_modules

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


class _Net(torch.nn.Module):
    """Two regions; the second takes keyword and non-tensor arguments and returns a ModelOutput."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(8, 16)
        self.second = _Head()

    def forward(self, x):
        return self.second(hidden=self.first(x), scale=2.0).last_hidden_state


class _Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 4)

    def forward(self, hidden, scale, shapes=((2, 3),)):
        return BaseModelOutput(last_hidden_state=self.proj(hidden.relu()) * scale)


class _Syncing(torch.nn.Module):
    """Waits for the device (`.item()`): cannot be captured."""

    def forward(self, x):
        return x * float(x.sum().item())


def test_graph_modules_replaces_named_forwards_and_cpu_calls_run_eagerly():
    net = _Net()
    x = torch.randn(3, 8)
    expected = net(x)
    assert graph_modules(net, frozenset({"first", "second"})) == 2
    assert isinstance(net.first.forward, GraphedForward)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), expected)
    assert not net.first.forward.graphs  # CPU tensors: no graph


def test_graph_modules_unknown_name_raises():
    with pytest.raises(ValueError, match=r"no submodule \['decoder'\] in _Net"):
        graph_modules(_Net(), frozenset({"first", "decoder"}))


def test_signature_separates_shapes_and_argument_values_and_refuses_unhashable():
    from torch.utils._pytree import tree_flatten

    def key(*args, **kwargs):
        return _signature(*tree_flatten((args, kwargs)))

    a = torch.empty(2, 3, device="meta")
    assert key(a) is None  # not a CUDA tensor
    assert key([1, 2], scale=2.0) == key([1, 2], scale=2.0)
    assert key([1, 2], scale=2.0) != key([1, 2], scale=3.0)
    assert key({1, 2}) is None  # a set is an unhashable leaf


@cuda
def test_replay_matches_eager_per_shape_and_outputs_are_fresh():
    net = _Net().cuda().eval()
    inputs = {n: torch.randn(n, 8, device="cuda") for n in (1, 5)}
    with torch.inference_mode():
        expected = {n: net(x) for n, x in inputs.items()}
        graph_modules(net, frozenset({"first", "second"}))
        first = {n: net(x) for n, x in inputs.items()}  # captures one graph per shape and region
        again = {n: net(x * 1) for n, x in inputs.items()}  # replays, new input tensors
        other = net(torch.zeros(5, 8, device="cuda"))
    assert len(net.first.forward.graphs) == len(net.second.forward.graphs) == 2
    assert all(g is not None for g in net.second.forward.graphs.values())
    for n in inputs:
        torch.testing.assert_close(first[n], expected[n])
        torch.testing.assert_close(again[n], expected[n])
    # outputs are copies: a later replay of the same graph left the earlier result alone
    torch.testing.assert_close(again[5], expected[5])
    assert not torch.equal(other, again[5])


@cuda
def test_keeps_the_most_recent_graphs_only():
    net = _Net().cuda().eval()
    graph_modules(net, frozenset({"first"}), max_graphs=2)
    with torch.inference_mode():
        for n in (1, 2, 3, 2):
            net(torch.randn(n, 8, device="cuda"))
    assert [key[1][0][0] for key in net.first.forward.graphs] == [3, 2]


@cuda
def test_uncapturable_region_runs_eagerly_with_a_warning(caplog):
    model = torch.nn.Sequential(_Syncing()).cuda()
    graph_modules(model, frozenset({"0"}))
    x = torch.ones(4, device="cuda")
    with torch.inference_mode():
        out = model(x)
        torch.testing.assert_close(model(x), out)
    torch.testing.assert_close(out, x * 4.0)
    assert list(model[0].forward.graphs.values()) == [None]
    assert "Sequential.0: not captured in a CUDA graph" in caplog.text
    assert "test_cuda_graphs.py" in caplog.text  # where it waits for the device
    torch.randn(2, device="cuda")  # the CUDA random generator is still usable


@cuda
def test_autograd_calls_run_eagerly():
    net = _Net().cuda()
    graph_modules(net, frozenset({"first"}))
    net(torch.randn(2, 8, device="cuda")).sum().backward()
    assert not net.first.forward.graphs
    assert net.first.weight.grad is not None


@cuda
def test_replays_from_two_threads_give_each_call_its_own_result():
    from concurrent.futures import ThreadPoolExecutor

    net = _Net().cuda().eval()
    inputs = [torch.randn(4, 8, device="cuda") for _ in range(64)]
    with torch.inference_mode():
        expected = [net(x) for x in inputs]
    graph_modules(net, frozenset({"first", "second"}))

    def run(x):
        with torch.inference_mode():
            return net(x)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, inputs))
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want)
