import argparse
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from refany3d.cli import _parser
from refany3d.config import (
    BuildSettings,
    EvaluateSettings,
    SampleSettings,
    TrainSettings,
    load_settings,
    parse_overrides,
)
from tests.s200k import Row, write_subjects200k

CLI = [sys.executable, "-m", "refany3d.cli"]


def _run(args, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=300)


def test_build_until_split_gives_crops_and_one_reject_per_bad_row(tmp_path):
    rows = [
        Row(side=64, pad=8, seed=1),
        Row(corrupt=True),
        Row(side=96, pad=16, seed=2),
        Row(scores=(5, 4, 5)),
        Row(valid=False),
        Row(item=""),
    ]
    write_subjects200k(tmp_path / "s200k.parquet", rows)
    out = tmp_path / "out"
    proc = _run(
        [
            "build",
            "--source",
            "subjects200k",
            "--data-files",
            str(tmp_path / "*.parquet"),
            "--until",
            "split",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CancelledError" not in proc.stderr + proc.stdout
    assert "per-stage yield" in proc.stdout
    table = pq.read_table(list((out / "data").glob("*.parquet"))).sort_by("sample_id")
    assert {"sample_id", "image", "caption", "item", "category"} <= set(table.column_names)
    got = table.to_pylist()
    assert [r["sample_id"] for r in got] == [
        "s200k-000000-left",
        "s200k-000000-right",
        "s200k-000002-left",
        "s200k-000002-right",
    ]
    for r, (row, j) in zip(got, [(rows[0], 0), (rows[0], 1), (rows[2], 0), (rows[2], 1)]):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))), row.views[j])
        assert r["caption"] == row.captions[j] and r["item"] == "ceramic mug"
    rejects = pq.read_table(list((out / "rejects").glob("*.parquet"))).to_pylist()
    assert sorted((r["source_id"], r["reason"]) for r in rejects) == [
        ("s200k-000001", "image_undecodable"),
        ("s200k-000003", "low_quality"),
        ("s200k-000004", "description_invalid"),
        ("s200k-000005", "empty_item"),
    ]
    assert (out / "README.md").exists() and (out / "stats.json").exists()


def test_build_bad_setting_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    proc = _run(["build", "--set", "segmenter.backend=foo", "--out", str(out)], tmp_path)
    assert proc.returncode == 2
    assert "segmenter.backend: 'foo' is not one of truth, sam, hf-sam" in proc.stderr
    assert not Path(out).exists()


def test_build_missing_data_files_is_clear(tmp_path):
    args = [
        "build",
        "--data-files",
        str(tmp_path / "none-*.parquet"),
        "--until",
        "split",
        "--out",
        str(tmp_path / "o"),
    ]
    proc = _run(args, tmp_path)
    assert proc.returncode == 2 and "no Parquet files match" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_help_lists_build_options():
    proc = subprocess.run(CLI + ["build", "--help"], capture_output=True, text=True, timeout=60)
    for flag in ("--source", "--data-files", "--limit", "--out", "--config", "--until", "--set"):
        assert flag in proc.stdout
    assert "0 = all rows" in " ".join(proc.stdout.split())


def test_build_missing_mesher_weights_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    args = ["build", "--until", "mesh", "--out", str(out), "--set", "mesher.backend=hunyuan3d"]
    proc = _run(args + ["--set", f"mesher.weights={tmp_path / 'none'}"], tmp_path)
    assert proc.returncode == 2 and "mesher.weights=" in proc.stderr
    assert "hunyuan3d-dit-v2-0/config.yaml" in proc.stderr and not out.exists()


@pytest.fixture(scope="module")
def skipped_bad_file_build(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("skip-bad")
    write_subjects200k(tmp_path / "good.parquet", [Row(seed=1)])
    (tmp_path / "junk.parquet").write_text("not Parquet")
    out = tmp_path / "out"
    args = ["build", "--data-files", str(tmp_path / "*.parquet"), "--until", "split", "--out", str(out)]
    proc = _run([*args, "--set", "source.skip_bad_files=true"], tmp_path)
    return tmp_path, out, proc


@pytest.mark.slow
def test_build_skip_bad_files_builds_the_good_files(skipped_bad_file_build):
    tmp_path, out, proc = skipped_bad_file_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {tmp_path / 'junk.parquet'}: not a Parquet file" in proc.stderr
    table = pq.read_table(list((out / "data").glob("*.parquet")))
    assert sorted(table.column("sample_id").to_pylist()) == ["good-000000-left", "good-000000-right"]


@pytest.mark.slow
def test_build_skip_bad_files_records_a_file_level_reject(skipped_bad_file_build):
    tmp_path, out, proc = skipped_bad_file_build
    rejects = pq.read_table(list((out / "rejects").glob("*.parquet"))).to_pylist()
    assert [(r["sample_id"], r["stage"], r["reason"]) for r in rejects if r["stage"] == "source"] == [
        ("junk", "source", "bad_file")
    ]
    (reject,) = [r for r in rejects if r["reason"] == "bad_file"]
    assert reject["detail"].startswith(f"{tmp_path / 'junk.parquet'}: not a Parquet file")
    stats = json.loads((out / "stats.json").read_text())["stages"]
    assert stats["source"]["dropped_bad_file"] == 1


def test_sample_bad_asset_exits_2_naming_the_file(tmp_path):
    bad = tmp_path / "broken.glb"
    bad.write_bytes(b"not a mesh")
    proc = _run(
        ["sample", "--asset", str(bad), "--prompt", "a chair", "--out", str(tmp_path / "o")], tmp_path
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"refany3d sample: error: asset {str(bad)!r}: unreadable")
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sample_then_evaluate_writes_images_and_metrics(tmp_path):
    import trimesh

    asset = tmp_path / "box.obj"
    box = trimesh.creation.box((1.0, 0.6, 0.3))
    box.visual.vertex_colors = np.tile([30, 160, 60, 255], (len(box.vertices), 1))
    box.export(asset)
    small = ["--set", "sampler.resolution=32", "--set", "render.resolution=32"]
    out = tmp_path / "samples" / "s0"
    args = ["sample", "--asset", str(asset), "--prompt", "a green box", "--out", str(out), "--views", "2"]
    proc = _run([*args, "--steps", "2", "--seed", "1", *small], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "should be kept in float32" not in proc.stderr  # diffusers' warning about an empty list
    assert Image.open(out / "image.png").size == (32, 32)
    proc = _run(["evaluate", "--samples", str(tmp_path / "samples")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CancelledError" not in proc.stderr + proc.stdout
    assert "silhouette_iou" in proc.stdout and "note: metrics.clip_weights is empty" in proc.stdout
    report = json.loads((tmp_path / "samples" / "metrics.json").read_text(), parse_constant=_no_nan)
    assert set(report["samples"]) == {"s0"} and "mean covers" in proc.stdout


def _no_nan(constant):
    raise AssertionError(f"{constant} in metrics.json: not JSON")


_COMMAND_SETTINGS = {
    "build": BuildSettings,
    "train": TrainSettings,
    "deploy": BuildSettings,
    "serve": BuildSettings,
    "sample": SampleSettings,
    "evaluate": EvaluateSettings,
}


@pytest.mark.parametrize("command", sorted(_COMMAND_SETTINGS))
def test_each_command_help_shows_one_of_its_own_settings(command):
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    text = " ".join(commands[command].format_help().split())
    example = re.search(r"e\.g\. --set (\S+=\S+)", text)
    assert example, text
    load_settings(_COMMAND_SETTINGS[command], overrides=parse_overrides([example[1]]), environ={})


def test_config_shows_the_effect_of_set_and_config(tmp_path):
    (tmp_path / "s.yaml").write_text("optim:\n  lr: 0.5\n")
    args = ["config", "--train", "--config", str(tmp_path / "s.yaml"), "--set", "model.num_views=2"]
    proc = subprocess.run(CLI + args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert rows["model.num_views"].split()[1] == "2" and "[default 8]" in rows["model.num_views"]
    assert rows["optim.lr"].split()[1] == "0.5" and "[default 1.0]" in rows["optim.lr"]
    assert "[default" not in rows["optim.steps"]
    bad = subprocess.run(CLI + ["config", "--set", "nope.x=1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
