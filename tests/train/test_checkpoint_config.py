"""Model settings travel with the checkpoint (config.json): resume and `sample --lora` take them from
the run; a user's setting that conflicts stops the command in one line naming it, and nothing in
the run changes. sample.json records where a sample came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh

from refany3d.cli import main
from refany3d.train.checkpoint import MODEL_FLAGS
from tests.train.test_cli_train import TINY


def _snapshot(root) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A 1-step CLI run of the tiny model with 2 views (its one checkpoint at step 1)."""
    root = tmp_path_factory.mktemp("trained")
    args = ["train", "--data", str(dataset), "--out", str(root / "run"), "--steps", "1"]
    assert main([*args, f"--set=data.cache={root}/cache", *TINY]) == 0
    return root


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    path = tmp_path_factory.mktemp("asset") / "box.obj"
    mesh = trimesh.creation.box((1.0, 0.6, 0.3))
    mesh.visual.vertex_colors = np.tile([30, 160, 60, 255], (len(mesh.vertices), 1))
    mesh.export(path)
    return path


def test_checkpoint_config_json_holds_the_model_flags_and_the_base(trained):
    (step,) = (trained / "run" / "checkpoints").glob("step-*")
    config = json.loads((step / "config.json").read_text())
    assert {f: config[f] for f in MODEL_FLAGS}["num_views"] == 2 and config["lora_rank"] == 16
    assert set(config["adapters"]) == {"reference", "domain"}
    assert (
        config["adapters"]["reference"]["r"] == 16
        and "x_embedder" in config["adapters"]["domain"]["target_modules"]
    )
    assert config["domain_switcher"]["embedding_dim"] == 256 and config["base"]["label"].startswith("tiny")
    assert "config.json" in json.loads((step / "manifest.json").read_text())["digests"]


def test_resume_takes_the_runs_model_settings_and_refuses_a_conflicting_one(
    dataset, trained, tmp_path, capsys
):
    run = tmp_path / "run"
    (run).mkdir()
    for path, data in _snapshot(trained / "run").items():
        (run / path.relative_to(trained / "run")).parent.mkdir(parents=True, exist_ok=True)
        (run / path.relative_to(trained / "run")).write_bytes(data)
    before = _snapshot(run)
    args = ["train", "--data", str(dataset), "--out", str(run), "--resume", f"--set=data.cache={tmp_path}/c"]
    tiny = [a for a in TINY if "num_views" not in a]  # the run's 2 views come from its config.json
    capsys.readouterr()
    assert main([*args, "--steps", "2", *tiny, "--set=model.lora_rank=8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "model.lora_rank: 8 was asked" in err and "trained with 16" in err
    assert _snapshot(run) == before  # nothing lost, nothing written
    assert main([*args, "--steps", "2", *tiny]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["settings"]["model"]["num_views"] == 2
    assert summary["counts"]["skipped_views_missing"] == 0


def test_sample_takes_views_from_the_checkpoint_and_records_its_provenance(trained, box, tmp_path, capsys):
    small = ["--set", "sampler.resolution=32", "--set", "render.resolution=32", "--steps", "1"]
    args = ["sample", "--asset", str(box), "--prompt", "a box", "--lora", str(trained / "run"), *small]
    before = _snapshot(trained / "run")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--views", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "model.num_views: 8 was asked" in err and "trained with 2" in err
    assert not (tmp_path / "bad").exists() and _snapshot(trained / "run") == before
    assert main([*args, "--out", str(tmp_path / "s"), "--seed", "3"]) == 0
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["views"] == 2 and len(list((tmp_path / "s" / "views").glob("rgb_*.png"))) == 2
    step = trained / "run" / "checkpoints" / "step-00000001"
    assert (meta["run"], meta["checkpoint"], meta["step"]) == (str(trained / "run"), str(step), 1)
    assert meta["base"]["label"].startswith("tiny") and meta["base"]["fingerprint"]
    assert meta["seed"] == 3 and meta["settings"]["sampler"]["seed"] == 3
    assert meta["settings"]["model"]["num_views"] == 2 and meta["settings"]["render"]["views"] == 2


def test_sample_from_a_checkpoint_directory_needs_no_settings(trained, box, tmp_path):
    from PIL import Image

    (step,) = (trained / "run" / "checkpoints").glob("step-*")
    pipeline = json.loads((step / "config.json").read_text())["pipeline"]
    assert pipeline == {
        "sampler.resolution": 32,
        "render.resolution": 32,
        "sampler.steps": 28,
        "sampler.guidance": 3.5,
    }
    args = [
        "sample",
        "--asset",
        str(box),
        "--prompt",
        "a box",
        "--lora",
        str(step),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(args) == 0  # no --set, --views or --steps: the checkpoint's config.json says it all
    settings = json.loads((tmp_path / "s" / "sample.json").read_text())["settings"]
    assert (settings["sampler"]["resolution"], settings["render"]["resolution"]) == (32, 32)
    assert settings["render"]["views"] == settings["model"]["num_views"] == 2
    assert Image.open(tmp_path / "s" / "image.png").size == (32, 32)


def test_checkpoint_has_a_model_card_and_peft_adapters_that_name_their_base(trained, dataset):
    import yaml
    from peft import PeftConfig
    from safetensors import safe_open

    from refany3d.storage.versions import version_id
    from refany3d.train.data import shard_files

    (step,) = (trained / "run" / "checkpoints").glob("step-*")
    card = (step / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and {"refany3d", "flux", "lora"} <= set(front["tags"])
    assert front["base_model"] is None  # the tiny default has no hub id: the card's text says what it is
    assert "tiny random-weight" in card and "| `num_views` | `2` |" in card
    facts = front["refany3d"]
    assert facts["step"] == 1 and facts["dataset_version"] == version_id(shard_files(str(dataset)))
    assert facts["metrics"]["loss"] > 0
    for name in ("reference", "domain"):
        config = PeftConfig.from_pretrained(step / "adapters" / name)
        assert config.base_model_name_or_path.startswith("tiny random-weight")
        with safe_open(step / "adapters" / name / "adapter_model.safetensors", "pt") as f:
            meta = f.metadata()
        assert meta["base_model_name_or_path"] == config.base_model_name_or_path and meta["part"] == name
    manifest = json.loads((step / "manifest.json").read_text())
    assert "README.md" in manifest["digests"] and manifest["dataset_version"] == facts["dataset_version"]


def test_warm_start_from_adapters_of_another_rank_fails_naming_the_setting(dataset, trained, tmp_path):
    from refany3d.config import SettingsError
    from refany3d.train.run import run_training
    from tests.train.conftest import tiny_settings

    before = _snapshot(trained / "run")
    settings = tiny_settings(
        dataset, tmp_path / "run", **{"checkpoint.init_adapters": trained / "run", "model.lora_rank": 8}
    )
    with pytest.raises(
        SettingsError, match=r"model.lora_rank: 8 was asked, but checkpoint.init_adapters .* 16; set it"
    ):
        run_training(settings)
    assert _snapshot(trained / "run") == before and not list((tmp_path / "run").rglob("*.safetensors"))
