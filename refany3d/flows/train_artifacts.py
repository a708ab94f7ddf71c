"""Prefect artifacts of a training run: loss curve, sample gallery, checkpoint links, summary table."""

from __future__ import annotations

import base64
import io
import os

from PIL import Image, ImageDraw
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from refany3d.flows.artifacts import artifact_key
from refany3d.storage.fs import url_to_fs

CURVE_SIZE = (640, 240)


def loss_curve_png(losses: list[float], size: tuple[int, int] = CURVE_SIZE) -> bytes:
    """A plain line plot of the loss per step (white background, axis range in the corner)."""
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    pad = 24
    draw.rectangle([pad, pad, w - pad, h - pad], outline=(180, 180, 180))
    if losses:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        n = max(len(losses) - 1, 1)
        points = [
            (pad + (w - 2 * pad) * i / n, h - pad - (h - 2 * pad) * (v - lo) / span)
            for i, v in enumerate(losses)
        ]
        draw.line(points, fill=(30, 90, 200), width=2) if len(points) > 1 else draw.point(points, "blue")
        draw.text(
            (pad + 4, 4), f"loss {hi:.4f} (top) .. {lo:.4f} (bottom), {len(losses)} steps", fill="black"
        )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _browsable(url: str) -> str:
    return url if "://" in url else "file://" + os.path.abspath(url)


def publish_training(result: dict) -> list[str]:
    """Create the four artifacts of a finished run from its summary (+ metrics); returns their keys."""
    name, summary = result["name"], result["summary"]
    label = (
        ""
        if not summary["tiny"]
        else f"\n\n> **{summary['base']}** — outputs show the pipeline, not quality.\n"
    )
    curve = _data_uri(loss_curve_png([r["loss"] for r in result["metrics"]]))
    keys = [artifact_key(name, s) for s in ("loss-curve", "samples", "checkpoints", "summary")]
    create_markdown_artifact(
        f"# {name}: training loss{label}\n\n![loss curve]({curve})\n",
        key=keys[0],
        description="loss per step",
    )
    gallery = []
    for url in summary["previews"][-4:]:
        fs, path = url_to_fs(url)
        gallery.append(
            f"**{url.rsplit('/', 1)[-1]}** (reference | RGB | point map)\n\n![]({_data_uri(fs.cat_file(path))})"
        )
    create_markdown_artifact(
        f"# {name}: sample gallery{label}\n\n" + ("\n\n".join(gallery) or "_no previews yet_") + "\n",
        key=keys[1],
        description="previews written during training",
    )
    links = "\n".join(f"- [{u.rsplit('/', 1)[-1]}]({_browsable(u)})" for u in summary["checkpoints"])
    create_markdown_artifact(
        f"# {name}: checkpoints\n\n{links or '_none written by this run_'}\n",
        key=keys[2],
        description="checkpoints",
    )
    counts = summary["counts"]
    rows = [
        {"field": "base model", "value": summary["base"]},
        {"field": "steps", "value": summary["steps"]},
        {
            "field": "resumed from step",
            "value": summary["resumed_from"] if summary["resumed_from"] is not None else "-",
        },
        {
            "field": "first loss",
            "value": f"{summary['first_loss']:.5f}" if summary["first_loss"] is not None else "-",
        },
        {
            "field": "last loss",
            "value": f"{summary['last_loss']:.5f}" if summary["last_loss"] is not None else "-",
        },
        {"field": "samples in dataset", "value": summary["samples"]},
        {"field": "processes", "value": summary["processes"]},
        *({"field": k, "value": v} for k, v in counts.items()),
    ]
    create_table_artifact(rows, key=keys[3], description=f"run summary of {name}")
    return keys


def publish_unchanged(name: str, version: str, run_dir: str, decided: dict) -> str:
    """The artifact of a scheduled run that found no new dataset version; returns its message."""
    outcome = "promoted" if decided.get("promote") else "not promoted"
    message = (
        f"dataset unchanged: version {version} was already trained in {run_dir} "
        f"({outcome}: {decided.get('reason', '-')}); nothing to do"
    )
    create_markdown_artifact(
        f"# {name}: dataset unchanged\n\n{message}.\n",
        key=artifact_key(name, "dataset-unchanged"),
        description=f"no new dataset version since {version}",
    )
    return message


def publish_decision(name: str, record: dict, pointer: str) -> str:
    """The evaluation table and the promotion artifact of a retrained version; returns its message."""
    rows = [
        {
            "metric": r["metric"],
            "better": r["better"],
            "candidate": f"{r['candidate']:.5f}",
            "promoted": f"{r['promoted']:.5f}",
            "regressed": "yes" if r["regressed"] else "no",
        }
        for r in record["comparison"]
    ] or [
        {"metric": m, "candidate": "-" if v is None else f"{v:.5f}"}  # a mean of no sample is null
        for m, v in record["metrics"].items()
    ]
    create_table_artifact(
        rows, key=artifact_key(name, "evaluation"), description=f"held-out metrics of {record['version']}"
    )
    verdict = "promoted" if record["promote"] else "not promoted"
    message = f"{record['version']} {verdict}: {record['reason']}"
    where = (
        f"`{pointer}` now points at `{record['checkpoint']}`" if record["promote"] else "pointer unchanged"
    )
    create_markdown_artifact(
        f"# {name}: {message}\n\nrun `{record['run']}`, step {record['step']}; {where}.\n",
        key=artifact_key(name, "promotion"),
        description=verdict,
    )
    return message
