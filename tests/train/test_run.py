"""The training loop on the tiny model: it learns, resumes exactly, caches encodings, counts skips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refany3d.config import SettingsError
from refany3d.models.flux.loss import flow_matching_losses
from refany3d.train import encode
from refany3d.train.checkpoint import list_checkpoints, resolve_adapters
from refany3d.train.run import run_training
from refany3d.train.trainer import (
    build_trainer,
    load_checkpoint,
    make_loader,
    prepare_micro_batch,
    train_step,
)
from tests.train._shards import write_dataset
from tests.train.conftest import tiny_settings

NO_DROPOUT = {"data.drop_text_prob": 0, "data.drop_references_prob": 0}


def _fixed_noise_losses(settings, trained: bool) -> np.ndarray:
    """[RGB, point-map] loss over 16 micro-batches of the data stream at its fixed per-position noise."""
    tr = build_trainer(settings)
    if trained:
        load_checkpoint(tr)
        tr.position = 0
    stream = iter(make_loader(tr))
    with torch.no_grad():
        rows = []
        for _ in range(16):
            batch, noise, _ = prepare_micro_batch(tr, next(stream))
            rows.append([float(x) for x in flow_matching_losses(tr.model, batch, noise=noise)])
    return np.mean(rows, axis=0)


def test_run_training_overfits_four_samples(dataset, tmp_path):
    # AdamW (selectable) converges in fewer steps than Prodigy's warm-up. The target RGB group has
    # no adapter by design (DESIGN §5): with a random frozen base only the point-map branch can
    # memorise its 4 samples; its loss must more than halve, the total fall by > 30%.
    settings = tiny_settings(
        dataset, tmp_path / "run", **NO_DROPOUT,
        **{"optim.optimizer": "adamw", "optim.lr": 3e-3, "optim.weight_decay": 0, "optim.batch_size": 4,
           "optim.steps": 300, "checkpoint.every": 300},
    )  # fmt: skip
    before = _fixed_noise_losses(settings, trained=False)
    run_training(settings)
    after = _fixed_noise_losses(settings, trained=True)
    assert after[1] < 0.5 * before[1], (before, after)
    assert after.sum() < 0.7 * before.sum() and after[0] < before[0], (before, after)


def test_run_training_resume_gives_the_uninterrupted_losses(dataset, tmp_path):
    common = {"checkpoint.every": 3, "data.drop_text_prob": 0.5, "data.drop_references_prob": 0.5}
    whole = run_training(tiny_settings(dataset, tmp_path / "whole", **common, **{"optim.steps": 6}))
    part = tmp_path / "part"
    first = run_training(tiny_settings(dataset, part, **common, **{"optim.steps": 3}))
    assert [c.step for c in list_checkpoints(str(part))] == [3]
    resumed = run_training(tiny_settings(dataset, part, **common, **{"optim.steps": 6}), resume=True)
    assert resumed.resumed_from == 3
    losses = [r["loss"] for r in whole.metrics]
    assert [r["loss"] for r in first.metrics] == losses[:3]
    assert [r["loss"] for r in resumed.metrics] == losses  # history kept, steps 4-6 recomputed
    assert len(set(losses)) == 6
    history = [json.loads(line)["loss"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert history == losses


def test_run_training_second_epoch_hits_the_latent_cache(dataset, tmp_path, monkeypatch):
    calls = []
    original = encode.encode_sample
    monkeypatch.setattr(
        encode, "encode_sample", lambda c, raw: calls.append(raw.sample_id) or original(c, raw)
    )
    result = run_training(tiny_settings(dataset, tmp_path / "a", **{"optim.steps": 8}))
    assert result.summary["counts"]["encoded"] == 4 and result.summary["counts"]["cache_hits"] == 4
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 4  # epoch 2: encoders not called
    # another run on the same dataset and cache never encodes
    other = tiny_settings(
        dataset, tmp_path / "b", **{"optim.steps": 4, "data.cache": str(tmp_path / "a") + "-cache"}
    )
    calls.clear()
    assert run_training(other).summary["counts"]["encoded"] == 0 and not calls


def test_run_training_latent_cache_follows_row_content_not_sample_ids(rows, tmp_path):
    cache = {"data.cache": str(tmp_path / "cache"), "optim.steps": 4}
    first = run_training(tiny_settings(write_dataset(tmp_path / "v1", rows), tmp_path / "r1", **cache))
    assert first.summary["counts"]["encoded"] == 4
    # a rebuild under the same sample ids: one new caption, one new target image, one new view
    changed = [dict(r) for r in rows]
    changed[0]["caption"] = "A different caption."
    changed[1]["image"] = rows[2]["image"]
    changed[2]["views_point_map"] = [rows[3]["views_point_map"][0], *rows[2]["views_point_map"][1:]]
    rebuilt = run_training(tiny_settings(write_dataset(tmp_path / "v2", changed), tmp_path / "r2", **cache))
    assert rebuilt.summary["counts"]["encoded"] == 3 and rebuilt.summary["counts"]["cache_hits"] == 1
    # an unchanged rebuild elsewhere reads everything from the cache
    same = run_training(tiny_settings(write_dataset(tmp_path / "v3", rows), tmp_path / "r3", **cache))
    assert same.summary["counts"]["encoded"] == 0 and same.summary["counts"]["cache_hits"] == 4


def test_run_training_counts_skipped_rows_and_goes_on(rows, tmp_path):
    bad = dict(rows[0], sample_id="broken", image={"bytes": b"\x89PNG broken", "path": None})
    root = write_dataset(tmp_path / "data", [bad, *rows[1:3]])
    result = run_training(tiny_settings(root, tmp_path / "run", **{"optim.steps": 6}))
    counts = result.summary["counts"]
    assert counts["skipped_image_corrupt"] == 2  # once per epoch (6 positions over 3 rows)
    assert counts["encoded"] == 2 and result.steps == 6


def test_run_training_writes_checkpoints_previews_and_labels_the_tiny_base(dataset, tmp_path):
    out = tmp_path / "run"
    settings = tiny_settings(
        dataset,
        out,
        **{"optim.steps": 4, "checkpoint.every": 1, "checkpoint.keep": 2, "checkpoint.sample_every": 2},
    )
    result = run_training(settings)
    assert [c.step for c in list_checkpoints(str(out))] == [3, 4]  # pruned to the 2 newest
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "manifest.json",
        "step-00000003",
        "step-00000004",
    ]
    manifest = json.loads((out / "checkpoints" / "step-00000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["position"] == 4 and manifest["tiny"]
    assert "tiny random-weight" in manifest["base"]
    assert [p.rsplit("/", 1)[-1] for p in result.previews] == ["step-00000002.png", "step-00000004.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiny"] and "tiny random-weight" in summary["base"]


def test_run_training_reads_and_writes_fsspec_urls(dataset, tmp_path):
    import uuid

    import fsspec

    fs, root = fsspec.filesystem("memory"), f"/train-{uuid.uuid4().hex}"
    for p in (dataset / "data").glob("*.parquet"):
        fs.pipe(f"{root}/ds/data/{p.name}", p.read_bytes())
    urls = {"data.cache": f"memory://{root}/cache", "checkpoint.every": 1}
    first = run_training(
        tiny_settings(f"memory://{root}/ds", f"memory://{root}/run", **urls, **{"optim.steps": 2})
    )
    assert first.checkpoints == [f"memory://{root}/run/checkpoints/step-0000000{i}" for i in (1, 2)]
    resumed = run_training(
        tiny_settings(f"memory://{root}/ds", f"memory://{root}/run", **urls, **{"optim.steps": 3}),
        resume=True,
    )
    assert resumed.resumed_from == 2 and fs.exists(
        f"{root}/run/checkpoints/step-00000003/adapters/domain_switcher.safetensors"
    )
    assert fs.exists(f"{root}/run/summary.json") and fs.glob(f"{root}/cache/*/*.safetensors")
    fs.rm(root, recursive=True)


def test_run_training_steps_only_on_batches_that_kept_a_sample(rows, tmp_path):
    bad = [dict(r, sample_id=f"broken-{i}", point_map=None) for i, r in enumerate(rows[:2])]
    root = write_dataset(tmp_path / "data", bad + rows[2:])
    result = run_training(tiny_settings(root, tmp_path / "run", **{"optim.steps": 4}))
    assert [r["step"] for r in result.metrics] == [1, 2, 3, 4]  # a batch of skipped samples is no step
    assert all(r["loss"] > 0 for r in result.metrics) and result.summary["first_loss"] > 0
    assert result.summary["counts"]["skipped_image_missing"] >= 2  # each bad row drawn, none a step


def test_run_training_with_only_unreadable_rows_stops_in_one_line(rows, tmp_path):
    bad = [dict(r, sample_id=f"broken-{i}", point_map=None) for i, r in enumerate(rows[:2])]
    root = write_dataset(tmp_path / "data", bad)
    with pytest.raises(SettingsError, match=r"data.shards: no readable sample .*skipped_image_missing 3"):
        run_training(tiny_settings(root, tmp_path / "run", **{"optim.steps": 3}))
    assert not (tmp_path / "run").exists()  # no step, so no metrics and no checkpoint


def test_run_training_refuses_a_used_out_without_resume(dataset, tmp_path):
    out = tmp_path / "run"
    longer = {"optim.steps": 4, "checkpoint.every": 1, "checkpoint.keep": 2}
    run_training(tiny_settings(dataset, out, **longer))
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(SettingsError, match="checkpoint.dir.*not empty.*--resume"):
        run_training(tiny_settings(dataset, out, **{**longer, "optim.steps": 2}))
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert [c.step for c in list_checkpoints(str(out))] == [3, 4]


def test_bf16_training_keeps_fp32_masters_that_take_updates_below_bf16_resolution(dataset, tmp_path):
    # AdamW at lr 1e-5 moves each weight by ~1e-5; a LoRA-A weight (~N(0, 1/16)) has a bf16 spacing
    # of ~2e-4, so in bf16 the update rounds away. Step 1 trains the zero-init B (A has no gradient
    # while B = 0); step 2 must move A.
    settings = tiny_settings(
        dataset, tmp_path / "run", **NO_DROPOUT,
        **{"runtime.dtype": "bfloat16", "optim.optimizer": "adamw", "optim.lr": 1e-5, "optim.weight_decay": 0},
    )  # fmt: skip
    tr = build_trainer(settings)
    model = tr.accelerator.unwrap_model(tr.model)
    assert next(model.flux.transformer_blocks[0].attn.to_q.base_layer.parameters()).dtype == torch.bfloat16
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in named.values()} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.domain_switcher.parameters())
    stream = iter(make_loader(tr))
    train_step(tr, [next(stream)])
    lora_a = {n: p.detach().clone() for n, p in named.items() if "lora_A" in n}
    train_step(tr, [next(stream)])
    moved = [(named[n] != before).float().mean().item() for n, before in lora_a.items()]
    spacing = [torch.finfo(torch.bfloat16).eps * before.abs().median().item() for before in lora_a.values()]
    assert min(spacing) > 1e-5 * 4  # the updates are well below bf16 resolution
    assert np.median(moved) > 0.99, moved  # (a few adapters see no tokens in this tiny layout)


def test_run_training_resume_skips_a_damaged_newest_checkpoint(dataset, tmp_path, caplog, capsys):
    common = {"checkpoint.every": 1, "checkpoint.keep": 3}
    out = tmp_path / "run"
    run_training(tiny_settings(dataset, out, **common, **{"optim.steps": 2}))
    newest, older = list_checkpoints(str(out))[-1], list_checkpoints(str(out))[-2]
    adapter = sorted((Path(newest.url) / "adapters").glob("*.safetensors"))[0]
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    intact = {p: p.read_bytes() for p in Path(older.url).rglob("*") if p.is_file()}
    capsys.readouterr()  # the training's progress bar
    adapters, _ = resolve_adapters(out)  # what `sample --lora RUN` loads
    err = capsys.readouterr().err
    assert adapters == Path(older.url) / "adapters" and len(err.strip().splitlines()) == 1
    assert "is damaged" in err and adapter.name in err and "Traceback" not in err
    with caplog.at_level("WARNING", logger="refany3d.train"):
        resumed = run_training(tiny_settings(dataset, out, **common, **{"optim.steps": 3}), resume=True)
    assert resumed.resumed_from == older.step == 1
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and adapter.name in lines[0]
    assert {p: p.read_bytes() for p in Path(older.url).rglob("*") if p.is_file()} == intact  # nothing lost


def test_train_step_holds_the_sdpa_kernel_preference_through_forward_and_backward(dataset, tmp_path):
    """Compiled blocks take the kernel chosen when traced, and checkpoint recomputation in
    backward must choose the same: the preference must hold in both."""
    from torch.nn.attention import SDPBackend

    tr = build_trainer(tiny_settings(dataset, tmp_path / "run", **{"model.sdpa_kernel": "cudnn"}))
    model = tr.accelerator.unwrap_model(tr.model)
    seen = {}

    def forward_hook(module, args, output):
        seen["forward"] = torch._C._get_sdp_priority_order()[0]
        output.rgb.register_hook(lambda grad: seen.update(backward=torch._C._get_sdp_priority_order()[0]))

    model.register_forward_hook(forward_hook)
    train_step(tr, [next(iter(make_loader(tr)))])
    assert seen == {"forward": int(SDPBackend.CUDNN_ATTENTION), "backward": int(SDPBackend.CUDNN_ATTENTION)}
