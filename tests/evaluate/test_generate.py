"""`refany3d evaluate --generate`: the dataset's assets drawn with a checkpoint's pipeline; bad
inputs stop in one line before Prefect starts."""

import json

import pytest

from refany3d.cli import main
from refany3d.evaluate.generate import dataset_assets, generate_samples
from tests.train._shards import rendered_rows, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dataset"), rendered_rows(3))


def test_dataset_assets_takes_the_first_by_sample_id(dataset):
    assert [r["sample_id"] for r in dataset_assets(str(dataset), 2)] == ["train-0-0000", "train-0-0001"]
    assert len(list(dataset_assets(str(dataset)))) == 3


def test_generate_samples_writes_one_sample_per_asset_with_its_id(dataset, tmp_path):
    from refany3d.config import SampleSettings, override

    small = {"sampler.resolution": 32, "sampler.steps": 1, "render.resolution": 32, "render.views": 2}
    settings = override(SampleSettings(), **small, **{"model.num_views": 2})
    written, notes = generate_samples(None, str(dataset), tmp_path / "s", settings, limit=2)
    assert [p.name for p in written] == ["train-0-0000", "train-0-0001"] and notes == []
    meta = json.loads((written[0] / "sample.json").read_text())
    assert meta["sample_id"] == "train-0-0000" and meta["prompt"].startswith("A ")
    assert (written[0] / "asset.glb").is_file() and (written[0] / "point_map16.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--generate"], "--generate: needs --dataset"),
        (["--lora", "x"], "--lora: only with --generate"),
        (["--generate", "--dataset", "{tmp}/none"], "no Parquet shards"),
    ],
)
def test_evaluate_generate_bad_inputs_exit_2_in_one_line(tmp_path, capsys, extra, message):
    args = ["evaluate", "--samples", str(tmp_path / "s"), *(a.format(tmp=tmp_path) for a in extra)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
