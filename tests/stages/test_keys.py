"""Content keys: code fingerprints that ignore comments and docstrings, and key chains in which a
change reaches exactly the stages at and below it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from refany3d.config import BuildSettings, override
from refany3d.stages import keys
from refany3d.stages.keys import batch_keys, code_digest, code_fingerprint, key_refs, module_closure
from refany3d.stages.read_source import SourceBatch

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


def test_batch_keys_name_the_batch_by_content_not_location():
    here, there = SourceBatch("/a/x.parquet", 0, 4), SourceBatch("s3://b/c/x.parquet", 0, 4)
    assert here.content_ref == there.content_ref
    assert SourceBatch("/a/x.parquet", 4, 8).content_ref != here.content_ref
    assert SourceBatch("/a/y.parquet", 0, 4).content_ref != here.content_ref  # sample ids carry it


def test_batch_keys_cover_the_seed_of_the_stages_it_drives():
    base = BuildSettings(until="pose")
    before, after = _keys(base), _keys(override(base, **{"source.seed": 7}))
    changed = {s for s in before if before[s] != after[s]}
    assert changed == {"detect", "segment", "mesh", "depth", "pose", "shard"}


def test_pose_is_keyed_on_the_device_only_where_it_runs_there():
    builtin = BuildSettings(until="pose")
    assert "runtime.device" not in key_refs(builtin, "pose")
    assert "runtime.device" in key_refs(builtin, "detect")
    fp = override(builtin, **{"pose.backend": "foundationpose"})
    assert {"runtime.device", "runtime.dtype"} <= set(key_refs(fp, "pose"))


def test_mesher_timeout_and_post_processes_are_not_in_the_keys():
    base = BuildSettings(until="mesh")
    assert _keys(override(base, **{"mesher.timeout_s": 1.0})) == _keys(base)
    assert _keys(override(base, **{"mesher.post_processes": 8})) == _keys(base)
    assert _keys(override(base, **{"mesher.batch_size": 2})) != _keys(base)  # the check can fail


def test_batch_keys_change_with_the_code_fingerprint(monkeypatch):
    base = BuildSettings(until="depth")
    before = _keys(base)
    real = keys.code_fingerprint
    monkeypatch.setattr(keys, "code_fingerprint", lambda s: real(s) + ("x" if s == "segment" else ""))
    after = _keys(base)
    assert {s for s in before if before[s] != after[s]} == {"segment", "depth", "shard"}


def _weights_dir(root: Path, scale: float = 1.0, shape: tuple[int, ...] = (4, 3)) -> Path:
    root.mkdir(parents=True)
    save_file({"w": np.full(shape, scale, np.float32)}, str(root / "model.safetensors"))
    (root / "config.json").write_text('{"hidden": 4}')
    (root / ".cache").mkdir()
    (root / ".cache" / "download.lock").write_text(str(root))  # bookkeeping: left out
    return root


def test_weights_fingerprint_covers_names_sizes_headers_and_data_not_location(tmp_path):
    a = keys.weights_fingerprint(str(_weights_dir(tmp_path / "a")))
    assert a == keys.weights_fingerprint(str(_weights_dir(tmp_path / "b")))
    assert a != keys.weights_fingerprint(str(_weights_dir(tmp_path / "values", scale=2.0)))
    assert a != keys.weights_fingerprint(str(_weights_dir(tmp_path / "shape", shape=(3, 4))))
    renamed = _weights_dir(tmp_path / "renamed")
    (renamed / "config.json").rename(renamed / "other.json")
    assert a != keys.weights_fingerprint(str(renamed))
    assert keys.weights_fingerprint("") == ""
    assert keys.weights_fingerprint(str(tmp_path / "none")).startswith("unresolved:")


def test_batch_keys_follow_weights_content_not_their_path(tmp_path):
    def detect_key(path: Path) -> str:
        settings = override(BuildSettings(until="segment"), **{"segmenter.weights": str(path)})
        return _keys(settings)

    a, b = detect_key(_weights_dir(tmp_path / "a")), detect_key(_weights_dir(tmp_path / "b"))
    assert a == b
    other = detect_key(_weights_dir(tmp_path / "c", scale=3.0))
    assert {s for s in a if a[s] != other[s]} == {"segment", "shard"}


def test_verify_key_follows_the_lpips_file(tmp_path):
    first, second = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    for path, scale in ((first, 1.0), (second, 1.0)):
        save_file({"lin0": np.full((1, 64, 1, 1), scale, np.float32)}, str(path))

    def verify_key(path: Path) -> str:
        return _keys(override(BuildSettings(until="verify"), **{"verify.lpips_weights": str(path)}))["verify"]

    assert verify_key(first) == verify_key(second)
    save_file({"lin0": np.full((1, 64, 1, 1), 0.5, np.float32)}, str(second))
    assert verify_key(first) != verify_key(second)


def test_verify_key_reads_the_default_lpips_file_when_the_setting_is_empty():
    from refany3d.models.weights import default_lpips_path

    fingerprints = keys.weights_fingerprints(BuildSettings(until="verify"))
    assert fingerprints["verify.lpips_weights"] == keys.weights_fingerprint(str(default_lpips_path()))
    assert fingerprints["verify.lpips_weights"] != ""  # scripts/setup.sh wrote it
