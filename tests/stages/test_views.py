import contextlib
import threading

import pytest

from refany3d.records import Sample, StageResult
from refany3d.stages._views import pipelined, record


def test_pipelined_keeps_chunk_order_and_passes_loaded_values():
    chunks = [[1, 2], [3], [4, 5, 6]]
    out = list(
        pipelined(
            chunks,
            load=lambda c: [x * 10 for x in c],
            infer=lambda c, loaded: sum(loaded),
            finish=lambda c, loaded, total: (list(c), loaded, total),
        )
    )
    assert [c for c, _ in out] == chunks
    assert [r for _, r in out] == [([1, 2], [10, 20], 30), ([3], [30], 30), ([4, 5, 6], [40, 50, 60], 150)]


def test_pipelined_loads_next_chunk_while_inferring():
    # infer(chunk 0) only returns once load(chunk 1) has started: a sequential loop would time out.
    second_load = threading.Event()

    def load(chunk):
        if chunk == [1]:
            second_load.set()
        return chunk

    def infer(chunk, loaded):
        if chunk == [0]:
            assert second_load.wait(timeout=10), "the next chunk was not loaded during the forward pass"
        return loaded

    assert [r for _, r in pipelined([[0], [1]], load, infer, lambda c, loaded, out: out)] == [[0], [1]]


def test_pipelined_takes_a_device_turn_per_forward_pass_and_none_over_the_last_finish():
    events, released = [], threading.Event()

    @contextlib.contextmanager
    def device():
        events.append("take")
        yield
        events.append("give back")
        released.set()

    def finish(chunk, loaded, out):
        if chunk == [2]:  # the last chunk's host work outlasts the forward passes
            assert released.wait(timeout=10), "the device was still held during the last finish"
        return out

    def infer(chunk, loaded):
        events.append(f"infer {chunk[0]}")
        return loaded

    out = [r for _, r in pipelined([[0], [1], [2]], lambda c: c, infer, finish, device=device)]
    assert out == [[0], [1], [2]]
    assert events == ["take", "infer 0", "give back"] + ["take", "infer 1", "give back"] + [
        "take",
        "infer 2",
        "give back",
    ]


def test_pipelined_holds_no_device_turn_while_its_next_chunk_loads():
    # another stage's forward pass (here: the load of chunk 1, which waits for a turn of its own)
    # gets the device while this stage waits for its load; one turn over all chunks deadlocks
    turn = threading.Lock()

    @contextlib.contextmanager
    def device():
        assert turn.acquire(timeout=10), "the device turn was never given back"
        try:
            yield
        finally:
            turn.release()

    def load(chunk):
        if chunk == [1]:
            with device():  # another batch's forward pass, while this stage's next load is late
                pass
        return chunk

    assert [
        r for _, r in pipelined([[0], [1]], load, lambda c, loaded: loaded, lambda c, x, out: out, device)
    ] == [
        [0],
        [1],
    ]


def test_pipelined_forward_passes_never_wait_behind_slow_finishes():
    # every finish waits until all forward passes ran: a finish that took the next chunk's load
    # thread would stall the forward passes (and time out)
    inferred = threading.Event()

    def infer(chunk, loaded):
        if chunk == [3]:
            inferred.set()
        return loaded

    def finish(chunk, loaded, out):
        assert inferred.wait(timeout=10), "a forward pass waited behind the finishes"
        return out

    chunks = [[0], [1], [2], [3]]
    assert [r for _, r in pipelined(chunks, lambda c: c, infer, finish)] == chunks


def test_pipelined_raises_the_failure_of_a_worker():
    def finish(chunk, loaded, out):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(pipelined([[1]], lambda c: c, lambda c, loaded: loaded, finish))


def test_pipelined_with_no_chunks_yields_nothing():
    assert list(pipelined([], lambda c: c, lambda c, loaded: loaded, lambda c, loaded, out: out)) == []


def test_record_tags_kept_samples_and_drops_with_reasons():
    samples = [Sample(f"s{i}", f"r{i}", "synthetic", f"#{i}") for i in range(2)]
    result = StageResult()
    record(result, "detect", "truth", samples, [samples[0].replace(), ("no_detection", 0.1, "why")])
    assert [s.sample_id for s in result.kept] == ["s0"]
    assert result.kept[0].backends["detect"] == "truth"
    drop = result.dropped[0]
    assert (drop.sample_id, drop.stage, drop.reason, drop.metric, drop.detail) == (
        "s1",
        "detect",
        "no_detection",
        0.1,
        "why",
    )
