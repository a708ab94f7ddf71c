"""Run-level errors through the real CLI entry: exit 2, one line naming the cause, no traceback,
and nothing started (the flow module is never imported)."""

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refany3d import cli
from refany3d.config import BuildSettings, SettingsError, override
from refany3d.preflight import check_writable, preflight
from tests.s200k import Row, write_subjects200k


@pytest.fixture
def no_flow(monkeypatch):
    """Importing the flow (and so starting Prefect) fails the test: errors must come first."""
    monkeypatch.setitem(sys.modules, "refany3d.flows.build_dataset", None)


def _fails(capsys, args: list[str]) -> str:
    code = cli.main(["build", "--until", "split", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("refany3d build: error: ")
    return err.strip()


def test_preflight_data_file_not_parquet(tmp_path, capsys, no_flow):
    write_subjects200k(tmp_path / "a.parquet", [Row()])
    (tmp_path / "b.parquet").write_text("id,image\n1,x\n")
    err = _fails(capsys, ["--data-files", str(tmp_path / "*.parquet"), "--out", str(tmp_path / "o")])
    assert f"source.data_files: {tmp_path / 'b.parquet'}: not a Parquet file" in err
    assert not (tmp_path / "o").exists()


def test_preflight_data_file_lacking_a_column(tmp_path, capsys, no_flow):
    pq.write_table(
        pa.table({"image": [b"x"], "collection": ["c"], "description": [None]}), tmp_path / "t.parquet"
    )
    err = _fails(capsys, ["--data-files", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o")])
    assert f"{tmp_path / 't.parquet'}: no column 'quality_assessment'" in err


@pytest.mark.parametrize(
    "name,text,where",
    [
        (
            "bad.yaml",
            "split:\n  min_view_size: 32\n max_view_size: 99\n",
            "YAML syntax error at line 3, column 2",
        ),
        ("bad.toml", "[split]\nmin_view_size = \n", "TOML syntax error at line 2, column 17"),
    ],
)
def test_preflight_config_syntax_error_names_file_and_line(tmp_path, capsys, no_flow, name, text, where):
    (tmp_path / name).write_text(text)
    err = _fails(capsys, ["--config", str(tmp_path / name), "--out", str(tmp_path / "o")])
    assert f"config file '{tmp_path / name}': {where}" in err


def test_preflight_out_not_writable_names_storage_out(tmp_path, capsys, no_flow):
    (tmp_path / "a-file").write_text("in the way")
    out = tmp_path / "a-file" / "dataset"
    err = _fails(capsys, ["--source", "synthetic", "--out", str(out)])
    assert f"storage.out='{out}': cannot write there (" in err


def test_preflight_skip_bad_files_returns_one_reject_per_file(tmp_path):
    write_subjects200k(tmp_path / "a.parquet", [Row()])
    (tmp_path / "b.parquet").write_bytes(b"")
    settings = override(
        BuildSettings(),
        **{
            "until": "split",
            "source.kind": "subjects200k",
            "source.data_files": str(tmp_path / "*.parquet"),
            "source.skip_bad_files": True,
            "storage.out": str(tmp_path / "o"),
        },
    )
    (reject,) = preflight(settings)
    assert (reject.stage, reject.reason, reject.sample_id) == ("source", "bad_file", "b")
    assert reject.detail.startswith(f"{tmp_path / 'b.parquet'}: not a Parquet file")


def test_check_writable_creates_the_directory_and_leaves_nothing(tmp_path):
    check_writable(str(tmp_path / "new" / "out"), "storage.out")
    assert list((tmp_path / "new" / "out").iterdir()) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(SettingsError, match="storage.artifacts="):
        check_writable(str(tmp_path / "f"), "storage.artifacts")
