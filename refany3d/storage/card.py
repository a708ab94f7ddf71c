"""Dataset card (`README.md` with a YAML header `datasets` understands) and `stats.json`."""

from __future__ import annotations

import json
import uuid
from typing import Any

import yaml

from refany3d.records import SHARD_SCHEMA_VERSION
from refany3d.storage.fs import url_to_fs
from refany3d.storage.store import join, write_atomic


def ensure_build_id(out: str) -> str:
    """The id of the build writing to `out`, created on first use (`OUT/.build-id`)."""
    fs, root = url_to_fs(out)
    path = join(root, ".build-id")
    if not fs.exists(path):
        write_atomic(fs, path, uuid.uuid4().hex.encode())
    return fs.cat_file(path).decode().strip()


def yield_table(stats: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """Rows of (stage, in, kept, dropped, transient, reasons) from per-stage counters; `transient`
    counts the drops the next build into this output tries again (timeouts, out of memory, I/O)."""
    rows = []
    for stage, c in stats.items():
        reasons = {k.removeprefix("dropped_"): v for k, v in sorted(c.items()) if k.startswith("dropped_")}
        rows.append(
            {
                "stage": stage,
                "in": c.get("in", 0),
                "kept": c.get("kept", 0),
                "dropped": c.get("dropped", 0),
                "transient": c.get("transient", 0),
                "reasons": ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "-",
            }
        )
    return rows


def _transient_note(stats: dict[str, dict[str, int]]) -> str:
    n = sum(c.get("transient", 0) for c in stats.values())
    if not n:
        return ""
    return (
        f"> **{n} transient drop(s)** (a timeout, out of memory, or an I/O error after its retries): "
        "they say nothing about the samples, and the next build into this output tries them again.\n\n"
    )


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no stages ran_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_card(
    out: str,
    name: str,
    stats: dict[str, dict[str, int]],
    settings: dict[str, Any],
    uses_truth: bool,
    until: str,
    shards: list[str],
) -> None:
    """Write `OUT/README.md` and `OUT/stats.json` for a finished (or partial, `until`) build."""
    header = {
        "pretty_name": name,
        "tags": ["3d", "pose-estimation", "point-map", "refany3d"]
        + (["synthetic", "ground-truth-backends"] if uses_truth else []),
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    }
    truth_note = (
        "> **Ground-truth backends.** Detection, segmentation, depth and/or meshes in this build came from\n"
        "> `truth` backends that read the synthetic source's ground truth (perturbed like real models).\n"
        "> It is a demonstration and test dataset, not the output of the real networks.\n\n"
        if uses_truth
        else ""
    )
    body = (
        f"# {name}\n\n{truth_note}"
        f"Built by refany3d (shard schema v{SHARD_SCHEMA_VERSION}), stages run up to `{until}`; "
        f"{len(shards)} shard(s) under `data/`, dropped samples under `rejects/`.\n\n"
        "## Yield per stage\n\n"
        + _markdown_table(yield_table(stats))
        + "\n"
        + _transient_note(stats)
        + "## Settings\n\n```yaml\n"
        + yaml.safe_dump(settings, sort_keys=False)
        + "```\n"
    )
    fs, root = url_to_fs(out)
    card = "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + body
    write_atomic(fs, join(root, "README.md"), card.encode())
    summary = {
        "name": name,
        "until": until,
        "uses_truth_backends": uses_truth,
        "shard_schema_version": SHARD_SCHEMA_VERSION,
        "shards": [s.rsplit("/", 1)[-1] for s in shards],
        "stages": stats,
        "settings": settings,
    }
    write_atomic(fs, join(root, "stats.json"), json.dumps(summary, indent=2, default=str).encode())
