"""Prefect flow `evaluate`: metrics of generated samples, a metrics table and a gallery artifact.

With `generate`, the flow first draws the samples itself: one per asset of `dataset` (up to
`limit`) with the `RefAny3DPipeline` of `lora` (None: untrained adapters), written under `samples`
(task `generate-samples`, the model loaded once), then scores them.

One task per sample (`evaluate-<sample>`); the CLIP / DINO models load once per process (cached
loaders), and metrics whose weights are not present are skipped with a note. The flow writes
`OUT/metrics.json` (`out`: a directory or an object store URL; default `samples`) and publishes
`<name>-metrics` (table: one row per sample plus the mean) and `<name>-gallery` (contact sheets:
views | RGB | point map). Samples the flow drew are its output too: with `out` they are copied to
`OUT/<sample>/` before metrics.json, the marker that lists them (`evaluate.run.write_report`).
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

from PIL import Image
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from refany3d.config import EvaluateSettings, SampleSettings
from refany3d.evaluate.run import (
    MEAN_OF,
    METRICS,
    build_report,
    dataset_rows,
    evaluate_sample,
    find_samples,
    read_sample,
    scorers,
    write_report,
)
from refany3d.flows.artifacts import artifact_key

GALLERY_WIDTH = 768


@task(task_run_name="evaluate-{path.name}", retries=1, retry_delay_seconds=2)
def evaluate_one(path: Path, settings: EvaluateSettings, dataset: str) -> dict[str, float]:
    """Metrics of one sample; its dataset row (mesh, views) is read here, by reference."""
    models, _ = scorers(settings)
    rows = dataset_rows(dataset, _sample_ids([path])) if dataset else None
    return evaluate_sample(read_sample(path, rows), settings, models)


def _table(report: dict) -> list[dict]:
    rows = [{"sample": name, **values} for name, values in report["samples"].items()]
    rows.append({"sample": "mean", **report["mean"]})
    total = len(report["samples"])
    rows.append({"sample": MEAN_OF, **{m: f"{n} of {total}" for m, n in report["count"].items()}})
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows
    ]


def _gallery(paths: list[Path], report: dict, limit: int) -> str:
    lines = ["# Samples: views | RGB | point map", ""]
    for path in paths[:limit]:
        sheet = path / "contact_sheet.png"
        if not sheet.is_file():
            continue
        image = Image.open(sheet).convert("RGB")
        image = image.resize((GALLERY_WIDTH, max(1, round(image.height * GALLERY_WIDTH / image.width))))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        values = report["samples"].get(path.name, {})
        caption = ", ".join(
            f"{m} {'-' if v is None else format(v, '.3f')}" for m, v in values.items() if m in METRICS
        )
        lines += [
            f"**{path.name}** — {caption}",
            "",
            f"![{path.name}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})",
            "",
        ]
    return "\n".join(lines)


@task(task_run_name="generate-samples")
def generate_samples(
    lora: str | None, dataset: str, samples: str, sample_settings: SampleSettings | None, limit: int
) -> list[str]:
    """One sample per dataset asset with the pipeline of `lora`; notes for the rows skipped."""
    from refany3d.evaluate.generate import generate_samples as draw

    return draw(lora, dataset, samples, sample_settings, limit)[1]


@flow(name="evaluate", log_prints=True)
def evaluate(
    samples: str,
    settings: EvaluateSettings,
    dataset: str = "",
    name: str = "refany3d-eval",
    generate: bool = False,
    lora: str | None = None,
    sample_settings: SampleSettings | None = None,
    limit: int = 0,
    out: str = "",
) -> dict:
    """Metrics of every sample under `samples` (first drawn there from `dataset`'s assets with the
    pipeline of `lora` when `generate`); returns the report (also in OUT/metrics.json, OUT =
    `out` or `samples`; with `generate` the samples drawn are copied under OUT before it)."""
    skipped = generate_samples(lora, dataset, samples, sample_settings, limit) if generate else []
    paths = find_samples(samples)
    _, notes = scorers(settings)  # load the models once here; notes for the skipped ones
    notes = notes + skipped
    futures = [evaluate_one.submit(p, settings, dataset) for p in paths]
    report = build_report({p.name: f.result() for p, f in zip(paths, futures)}, notes, settings)
    drawn = paths if generate and out and out != samples else []  # this run's output: beside metrics.json
    report["path"] = write_report(out or samples, report, drawn)
    create_table_artifact(
        _table(report), key=artifact_key(name, "metrics"), description="; ".join(notes) or None
    )
    create_markdown_artifact(
        _gallery(paths, report, settings.metrics.gallery_samples), key=artifact_key(name, "gallery")
    )
    return report


def _sample_ids(paths: list[Path]) -> set[str]:
    return {json.loads((p / "sample.json").read_text()).get("sample_id", "") for p in paths} - {""}
