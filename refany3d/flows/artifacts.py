"""What operators see of a build in the Prefect UI: yield table, progress, sample gallery, links.

`BuildReport` is fed one finished (stage, batch) at a time by the flow. It keeps the per-stage
counters, updates a progress artifact as tasks finish, republishes the yield table artifact (a new
version under the same key) whenever a stage completes or every few seconds, and at the end adds
a markdown gallery of a few samples and a link artifact to the shards and the dataset card.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from typing import Any

import numpy as np
from PIL import Image
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from refany3d.records import (
    DEPTH,
    IMAGE,
    MASK,
    OVERLAY,
    POINT_MAP,
    VIEWS_POINT_MAP,
    VIEWS_RGB,
    Rejection,
    Sample,
    StageResult,
)
from refany3d.storage.store import ArtifactStore, join

GALLERY_SAMPLES = 4
THUMB_PX = 128
ORBIT_PX = 64  # side of each orbit view in the gallery's strip


def artifact_key(name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from a dataset name."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "refany3d"
    return f"{base}-{suffix}"


class BuildReport:
    """Per-stage counters of one build and the artifacts that show them."""

    def __init__(self, name: str, stages: list[str], n_batches: int, table_every_s: float = 5.0) -> None:
        self.name = name
        self.stages = stages
        self.n_batches = n_batches
        self.table_every_s = table_every_s
        self.counts = {s: {"batches": 0, "in": 0, "kept": 0, "dropped": 0, "transient": 0} for s in stages}
        self.reasons: dict[str, dict[str, int]] = {s: {} for s in stages}
        self._done = 0
        self._total = max(1, len(stages) * n_batches)
        self._last_table = 0.0
        self._last_progress = 0.0
        self._progress_id = create_progress_artifact(
            0.0, key=artifact_key(name, "progress"), description=f"{name}: stage x batch tasks finished"
        )
        self._publish_table("started")

    def add(self, stage: str, n_in: int, result: StageResult) -> None:
        """Count one finished (stage, batch); refresh the artifacts when it is worth it."""
        c = self.counts[stage]
        c["batches"] += 1
        c["in"] += n_in
        c["kept"] += len(result.kept)
        c["dropped"] += len(result.dropped)
        c["transient"] += sum(r.transient for r in result.dropped)
        for reason, n in reason_counts(result.dropped).items():
            self.reasons[stage][reason] = self.reasons[stage].get(reason, 0) + n
        self._done += 1
        now = time.monotonic()
        if now - self._last_progress > 1.0 or self._done == self._total:
            update_progress_artifact(self._progress_id, 100.0 * self._done / self._total)
            self._last_progress = now
        if c["batches"] == self.n_batches or now - self._last_table > self.table_every_s:
            self._publish_table(f"{self._done}/{self._total} tasks")

    def add_counts(self, counts: dict[str, dict[str, int]], reasons: dict[str, dict[str, int]]) -> None:
        """Add another report's counters (a finished partition's, `counts` and `reasons`)."""
        for stage, c in counts.items():
            for k, v in c.items():
                self.counts[stage][k] += v
            for reason, n in reasons.get(stage, {}).items():
                self.reasons[stage][reason] = self.reasons[stage].get(reason, 0) + n
        self._done = sum(c["batches"] for c in self.counts.values())
        update_progress_artifact(self._progress_id, 100.0 * self._done / self._total)
        self._publish_table(f"{self._done}/{self._total} tasks")

    def add_file_rejects(self, stage: str, rejections: list[Rejection]) -> None:
        """Count rejects that belong to no batch (whole source files skipped before planning)."""
        self.counts[stage]["dropped"] += len(rejections)
        for reason, n in reason_counts(rejections).items():
            self.reasons[stage][reason] = self.reasons[stage].get(reason, 0) + n

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters in the card's format: in, kept, dropped, transient (the drops of `dropped`
        that the next run tries again), dropped_<reason> per stage."""
        out = {}
        for s in self.stages:
            c = self.counts[s]
            out[s] = {"in": c["in"], "kept": c["kept"], "dropped": c["dropped"], "transient": c["transient"]}
            out[s].update({f"dropped_{k}": v for k, v in sorted(self.reasons[s].items())})
        return out

    def rows(self) -> list[dict[str, Any]]:
        """The yield table: one row per stage."""
        return [
            {
                "stage": s,
                "batches": f"{self.counts[s]['batches']}/{self.n_batches}",
                "in": self.counts[s]["in"],
                "kept": self.counts[s]["kept"],
                "dropped": self.counts[s]["dropped"],
                "transient": self.counts[s]["transient"],
                "dropped by reason": ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons[s].items()))
                or "none",
            }
            for s in self.stages
        ]

    def _publish_table(self, status: str) -> None:
        create_table_artifact(
            self.rows(),
            key=artifact_key(self.name, "yield"),
            description=f"{self.name}: per-stage yield ({status})",
        )
        self._last_table = time.monotonic()

    def finish(
        self, out: str, shards: list[str], samples: list[Sample], store: ArtifactStore, uses_truth: bool
    ) -> None:
        """Final table and progress, the sample gallery, and the link to shards + card."""
        self._publish_table("finished")
        update_progress_artifact(self._progress_id, 100.0)
        create_markdown_artifact(
            gallery_markdown(self.name, samples[:GALLERY_SAMPLES], store, uses_truth),
            key=artifact_key(self.name, "gallery"),
            description=f"{self.name}: a few samples that reached the last stage",
        )
        create_link_artifact(
            _browsable(out),
            link_text=f"{len(shards)} shard(s) and dataset card in {out}",
            key=artifact_key(self.name, "shards"),
            description=f"shards: {join(out, 'data')}; card: {join(out, 'README.md')}; stats: {join(out, 'stats.json')}",
        )


def reason_counts(dropped: list[Rejection]) -> dict[str, int]:
    """Drops per reason, sorted by reason."""
    counts: dict[str, int] = {}
    for r in dropped:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    return dict(sorted(counts.items()))


def _browsable(url: str) -> str:
    return url if "://" in url else "file://" + os.path.abspath(url)


# --------------------------------------------------------------------------- gallery


def _data_uri(image: Image.Image, box: tuple[int, int] = (THUMB_PX, THUMB_PX)) -> str:
    image = image.copy()
    image.thumbnail(box)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _open(store: ArtifactStore, uri: str) -> Image.Image:
    return Image.open(io.BytesIO(store.get(uri)))


def _mask_overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The view with the mask tinted red (what the segmenter kept)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask.convert("L").resize(image.size), dtype=np.float32)[..., None] / 255.0
    red = np.array([255.0, 40.0, 40.0], dtype=np.float32)
    return Image.fromarray((rgb * (1 - 0.5 * m) + red * 0.5 * m).astype(np.uint8))


def _depth_image(data: bytes) -> Image.Image:
    """Depth (npz key `depth`, metres) as grey levels, near = bright, empty = black."""
    depth = np.load(io.BytesIO(data))["depth"].astype(np.float32)
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape, dtype=np.uint8)
    if valid.any():
        lo, hi = np.percentile(depth[valid], [2, 98])
        out[valid] = (255 * (1 - np.clip((depth[valid] - lo) / max(hi - lo, 1e-6), 0, 1))).astype(np.uint8)
    return Image.fromarray(out)


def _cells(sample: Sample, store: ArtifactStore) -> dict[str, str]:
    """Thumbnail data URIs of one sample, by column."""
    art = sample.artifacts
    cells: dict[str, str] = {}
    if IMAGE in art:
        image = _open(store, art[IMAGE])
        cells["image"] = _data_uri(image)
        if MASK in art:
            cells["mask"] = _data_uri(_mask_overlay(image, _open(store, art[MASK])))
    if DEPTH in art:
        cells["depth"] = _data_uri(_depth_image(store.get(art[DEPTH])))
    if OVERLAY in art:
        cells["overlay"] = _data_uri(_open(store, art[OVERLAY]))
    if POINT_MAP in art:
        cells["point map"] = _data_uri(_open(store, art[POINT_MAP]))
    if VIEWS_RGB in art:
        strip = _orbit_strip(store, json.loads(art[VIEWS_RGB]), json.loads(art.get(VIEWS_POINT_MAP, "[]")))
        cells["orbit views"] = _data_uri(strip, (strip.width, strip.height))
    return cells


def _orbit_strip(store: ArtifactStore, rgb: list[str], point_maps: list[str]) -> Image.Image:
    """All orbit views in one image: RGB in the top row, their point maps below (ORBIT_PX tiles)."""
    rows = [row for row in (rgb, point_maps) if row]
    strip = Image.new("RGB", (ORBIT_PX * max(len(r) for r in rows), ORBIT_PX * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, uri in enumerate(row):
            tile = _open(store, uri).convert("RGB").resize((ORBIT_PX, ORBIT_PX), Image.BILINEAR)
            strip.paste(tile, (x * ORBIT_PX, y * ORBIT_PX))
    return strip


def gallery_markdown(name: str, samples: list[Sample], store: ArtifactStore, uses_truth: bool) -> str:
    """Markdown table of a few samples with embedded thumbnails: image, mask, depth, point-map
    overlay, point map, and a strip of the orbit views (RGB over point maps)."""
    lines = [f"# {name}: sample gallery", ""]
    if uses_truth:
        lines += [
            "> Built with ground-truth backends on synthetic data (a demonstration, not real networks).",
            "",
        ]
    rows = []
    for sample in samples:
        try:
            rows.append((sample, _cells(sample, store)))
        except (OSError, ValueError, KeyError) as err:  # a gallery must never fail a finished build
            rows.append((sample, {"error": f"{type(err).__name__}: {err}"}))
    if not rows:
        return "\n".join(lines + ["_no sample reached the last stage_", ""])
    cols = list(dict.fromkeys(c for _, cells in rows for c in cells))
    lines += ["| sample | item | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for sample, cells in rows:
        shown = [
            (f"![{c}]({cells[c]})" if cells[c].startswith("data:") else cells[c]) if c in cells else "-"
            for c in cols
        ]
        lines.append(f"| `{sample.sample_id}` | {sample.item or '-'} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"
