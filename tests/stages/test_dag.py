import pytest

from refany3d.stages.dag import STAGES, ancestors, shard_columns, stage_function


def test_ancestors_runs_only_the_needed_branch():
    assert ancestors("split") == ["source", "quality", "split"]
    assert "mesh" not in ancestors("depth") and "depth" not in ancestors("mesh")
    assert {"mesh", "depth"} <= set(ancestors("pose"))


def test_stages_are_in_topological_order():
    seen: set[str] = set()
    for name, spec in STAGES.items():
        assert set(spec.parents) <= seen, name
        seen.add(name)


def test_shard_columns_grow_with_until():
    assert shard_columns("split")[:3] == ["sample_id", "source", "source_id"]
    assert {"image", "caption", "item", "category"} <= set(shard_columns("split"))
    assert "mask" not in shard_columns("split") and "mask" in shard_columns("segment")


def test_unknown_stage_is_an_error():
    with pytest.raises(KeyError, match="unknown stage"):
        ancestors("paint")


def test_stage_function_resolves_source_stages():
    assert stage_function("split").__name__ == "split_pair"
