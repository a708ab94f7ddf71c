import gc

from refany3d.flows.memory import GarbageCollector


class _Clock:
    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 100.0, tick  # each reading advances it by `tick`

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _collector(share: float, costs: list[float], clock: _Clock, runs: list[str]) -> GarbageCollector:
    def everything():  # each full collection takes the next of `costs` seconds
        runs.append("full")
        clock.now += costs.pop(0)

    return GarbageCollector(share, clock, everything, lambda: runs.append("newer"))


def test_full_collections_are_spaced_by_their_own_cost_over_the_share_and_newer_ones_run_between():
    clock, runs = _Clock(), []
    garbage = _collector(0.01, [0.5, 0.5], clock, runs)
    assert garbage.after_batch()  # the first batch: nothing measured yet
    clock.now += 49.0
    assert not garbage.after_batch()  # 49 s after a 0.5 s collection: 1.02 % of the wall
    clock.now += 1.0
    assert garbage.after_batch()  # 50 s: 1 %
    assert runs == ["full", "newer", "full"]


def test_the_spacing_follows_the_last_full_collections_cost():
    clock, runs = _Clock(), []
    garbage = _collector(0.1, [2.0, 0.1, 0.1], clock, runs)
    assert garbage.after_batch()
    clock.now += 19.0
    assert not garbage.after_batch()  # 19 s after a 2 s collection, at a 10 % share
    clock.now += 1.0
    assert garbage.after_batch()  # this one takes 0.1 s: the next may run 1 s after it
    clock.now += 0.9
    assert not garbage.after_batch()
    clock.now += 0.1
    assert garbage.after_batch()
    assert runs == ["full", "newer", "full", "newer", "full"]


class _Node:
    pass


def _cycle() -> list[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return [a, b]


def _nodes() -> int:
    gc.unfreeze()  # count the frozen ones too (the collector freezes them again as it goes)
    count = sum(isinstance(o, _Node) for o in gc.get_objects())
    gc.freeze()
    return count


def test_newer_cycles_go_after_each_batch_frozen_ones_at_the_next_full_collection_nothing_stays_frozen():
    clock = _Clock(tick=0.01)  # a full collection "takes" 0.01 s: the next is due 1 s later
    with GarbageCollector(share=0.01, clock=clock) as garbage:
        in_flight = _cycle()  # a batch in flight at the first full collection: frozen with it
        assert garbage.after_batch() and gc.get_freeze_count() > 0
        newer = _cycle()
        del newer
        assert not garbage.after_batch()  # the newer cycle is freed, the frozen one is not yet
        assert _nodes() == 2
        del in_flight
        assert not garbage.after_batch() and _nodes() == 2  # dead, but frozen
        clock.now += 3600.0
        assert garbage.after_batch()  # the full collection frees it
        assert _nodes() == 0
    assert gc.get_freeze_count() == 0
