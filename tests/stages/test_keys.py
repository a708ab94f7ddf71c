"""Content keys: code fingerprints that ignore comments and docstrings, and key chains in which a
change reaches exactly the stages at and below it."""

from __future__ import annotations

from refany3d.config import BuildSettings, override
from refany3d.stages.keys import batch_keys, code_digest, code_fingerprint, module_closure

CODE = '''"""Module doc."""
import refany3d.render.mesh
from refany3d.stages import _views


def f(x):
    """Doc."""
    return x + 1  # why
'''


def test_code_digest_ignores_comments_docstrings_and_layout():
    same = CODE.replace("# why", "# another reason").replace('"""Doc."""', '"""Other doc."""')
    same = same.replace("return x + 1", "return (x\n            + 1)")
    assert code_digest(same)[0] == code_digest(CODE)[0]


def test_code_digest_changes_with_code():
    assert code_digest(CODE.replace("x + 1", "x + 2"))[0] != code_digest(CODE)[0]


def test_code_digest_lists_package_imports_and_their_parents():
    refs = code_digest(CODE)[1]
    assert {"refany3d.render.mesh", "refany3d.render", "refany3d.stages._views"} <= set(refs)
    late = code_digest('import importlib\nimportlib.import_module("refany3d.synthetic.build")\n')[1]
    assert "refany3d.synthetic.build" in late


def test_module_closure_follows_imports_transitively_and_no_further():
    closure = module_closure("refany3d.stages.detect")
    assert "refany3d.models.detector.truth" in closure  # through models/detector/__init__.py
    assert "refany3d.stages._views" in closure
    assert not any(m.startswith("refany3d.flows") for m in closure)
    assert code_fingerprint("detect") != code_fingerprint("segment")


def _keys(settings: BuildSettings, file_hash: str = "f0") -> dict[str, str]:
    return batch_keys(settings, "data/x.parquet#0:4", file_hash)


def test_batch_keys_change_at_and_below_the_changed_stage_only():
    base = BuildSettings(until="depth")
    before = _keys(base)
    after = _keys(override(base, **{"detector.truth_dilation": 0.3}))
    changed = {s for s in before if before[s] != after[s]}
    assert changed == {"detect", "segment", "depth", "shard"}


def test_batch_keys_cover_source_file_until_and_device_not_scheduling():
    base = BuildSettings(until="depth")
    assert set(_keys(base).values()).isdisjoint(_keys(base, "f1").values())
    assert _keys(override(base, **{"runtime.workers": 7, "runtime.batches_in_flight": 9})) == _keys(base)
    assert _keys(override(base, **{"runtime.dtype": "bfloat16"}))["detect"] != _keys(base)["detect"]
    split = _keys(BuildSettings(until="split"))
    assert split["split"] == _keys(base)["split"] and split["shard"] != _keys(base)["shard"]
