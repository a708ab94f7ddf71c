import json

from refany3d.config import EvaluateSettings
from refany3d.flows.evaluate import evaluate
from tests.evaluate._samples import make_asset, make_perfect, write_samples


def test_evaluate_flow_writes_metrics_and_publishes_table_and_gallery(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    asset = make_asset()
    root = write_samples(tmp_path, asset, make_perfect(asset))
    report = evaluate(str(root), EvaluateSettings(), name="Eval Test")
    saved = json.loads((root / "metrics.json").read_text())
    assert saved["samples"].keys() == {"a-perfect", "b-wrong"} and report["path"] == str(
        root / "metrics.json"
    )
    assert any("metrics.clip_weights is empty" in n for n in saved["notes"])
    with get_client(sync_client=True) as client:
        keys = ["eval-test-metrics", "eval-test-gallery"]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {a.key: a for a in found}
    assert set(by_key) == set(keys)
    rows = by_key["eval-test-metrics"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["sample"] for r in rows] == ["a-perfect", "b-wrong", "mean", "mean covers"]
    assert by_key["eval-test-gallery"].data.count("data:image/png;base64,") == 2


def test_evaluate_cli_generates_with_a_checkpoints_pipeline_into_s3(prefect_harness, s3, tmp_path, capsys):
    """`refany3d evaluate --generate --out s3://...`: the samples the flow drew, then metrics.json
    (the marker that lists them) land in the bucket; --samples holds only the local copy."""
    import io

    import numpy as np
    from PIL import Image

    from refany3d.cli import main
    from refany3d.config import SampleSettings, override
    from refany3d.render.mesh import load_mesh
    from refany3d.sampling import RefAny3DPipeline
    from refany3d.storage.fs import url_to_fs
    from tests.train._shards import rendered_rows, write_dataset

    rows = rendered_rows(2)
    dataset = write_dataset(tmp_path / "dataset", rows)
    small = {"sampler.resolution": 32, "sampler.steps": 2, "render.resolution": 32, "render.views": 2}
    settings = override(SampleSettings(), **small, **{"model.num_views": 2})
    checkpoint = RefAny3DPipeline.from_pretrained(settings=settings).save_pretrained(tmp_path / "ckpt")
    samples, out = tmp_path / "samples", s3.bucket() + "/evals/gen"
    args = ["--dataset", str(dataset), "--lora", str(checkpoint), "--samples", str(samples), "--out", out]
    assert main(["evaluate", "--generate", *args]) == 0, capsys.readouterr().err
    assert f"wrote {out}/metrics.json" in capsys.readouterr().out
    fs, root = url_to_fs(out)
    report = json.loads(fs.cat_file(f"{root}/metrics.json"))
    ids = sorted(r["sample_id"] for r in rows)
    assert sorted(report["samples"]) == ids and report["count"]["silhouette_iou"] == 2
    assert not (samples / "metrics.json").exists()
    local = sorted(p.relative_to(samples).as_posix() for p in samples.rglob("*") if p.is_file())
    assert sorted(p.removeprefix(f"{root}/") for p in fs.find(root)) == sorted([*local, "metrics.json"])
    meta = json.loads(fs.cat_file(f"{root}/{ids[0]}/sample.json"))
    assert meta["sample_id"] == ids[0] and meta["checkpoint"] == str(checkpoint)
    # what the flow scored is what the checkpoint's pipeline draws for that asset and caption
    row = next(r for r in rows if r["sample_id"] == ids[0])
    mine = RefAny3DPipeline.from_pretrained(checkpoint)(
        load_mesh(row["mesh_glb"], file_type="glb"), row["caption"]
    )
    drawn = Image.open(io.BytesIO(fs.cat_file(f"{root}/{ids[0]}/image.png")))
    assert np.array_equal(np.asarray(drawn), mine.image)
