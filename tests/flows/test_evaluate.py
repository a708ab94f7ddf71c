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
