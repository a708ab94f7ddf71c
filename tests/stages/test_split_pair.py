import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from refany3d.config import BuildSettings, override
from refany3d.records import IMAGE
from refany3d.stages.context import StageContext
from refany3d.stages.filter_quality import filter_quality
from refany3d.stages.read_source import plan_batches, read_source
from refany3d.stages.split_pair import (
    BAD_LAYOUT,
    EMPTY_CAPTION,
    IMAGE_TOO_LARGE,
    IMAGE_UNDECODABLE,
    MISSING_IMAGE,
    VIEW_TOO_SMALL,
    pair_layout,
    split_pair,
)
from refany3d.storage.store import ArtifactStore
from tests.s200k import Row, flat_png, png_header, write_subjects200k


def _split(tmp_path, rows, **changes):
    path = tmp_path / "pairs.parquet"
    write_subjects200k(path, rows)
    ctx = StageContext(store=ArtifactStore(str(tmp_path / "store")))
    settings = override(BuildSettings(), **changes)
    (batch,) = plan_batches([str(path)], batch_size=64)
    return split_pair(read_source(batch, settings, ctx).kept, settings, ctx), ctx


@pytest.mark.parametrize("side,pad", [(64, 8), (96, 16), (80, 0), (512, 8), (1024, 16)])
def test_pair_layout_derives_padding(side, pad):
    assert pair_layout(2 * side + 3 * pad, side + 2 * pad) == (pad, side)


def test_pair_layout_rejects_non_pairs():
    with pytest.raises(ValueError):
        pair_layout(100, 100)


def test_split_pair_crops_views_exactly_for_several_paddings(tmp_path):
    rows = [Row(side=64, pad=8, seed=1), Row(side=96, pad=16, seed=2), Row(side=72, pad=0, seed=3)]
    result, ctx = _split(tmp_path, rows)
    assert not result.dropped
    assert [s.sample_id for s in result.kept] == [
        f"pairs-{i:06d}-{side}" for i in range(3) for side in ("left", "right")
    ]
    for i, row in enumerate(rows):
        for j, side in enumerate(("left", "right")):
            view = result.kept[2 * i + j]
            crop = np.asarray(Image.open(io.BytesIO(ctx.store.get(view.artifacts[IMAGE]))))
            np.testing.assert_array_equal(crop, row.views[j])
            assert view.caption == row.captions[j] and view.side == side
            assert view.metrics["pair_padding"] == row.pad


def test_split_pair_jpeg_row_is_close(tmp_path):
    (row,) = rows = [Row(side=64, pad=16, seed=4, fmt="JPEG")]
    result, ctx = _split(tmp_path, rows)
    crop = np.asarray(Image.open(io.BytesIO(ctx.store.get(result.kept[0].artifacts[IMAGE]))), dtype=float)
    assert crop.shape == (64, 64, 3)
    # JPEG blurs random noise; the right crop still correlates strongly with the right view.
    assert np.corrcoef(crop.ravel(), row.views[0].ravel())[0, 1] > 0.5


def test_split_pair_corrupt_image_rejected_and_run_goes_on(tmp_path):
    result, _ = _split(tmp_path, [Row(seed=1), Row(corrupt=True), Row(seed=2)])
    assert len(result.kept) == 4
    assert [(r.source_id, r.stage, r.reason) for r in result.dropped] == [
        ("pairs-000001", "split", IMAGE_UNDECODABLE)
    ]


def test_split_pair_drop_reasons(tmp_path):
    result, _ = _split(tmp_path, [Row(side=32, pad=4), Row(captions=("", "right only"))])
    reasons = sorted((r.sample_id, r.reason) for r in result.dropped)
    assert reasons == [("pairs-000000", VIEW_TOO_SMALL), ("pairs-000001-left", EMPTY_CAPTION)]


def test_split_pair_bad_layout_and_missing_image(tmp_path):
    square = io.BytesIO()
    Image.new("RGB", (50, 50)).save(square, format="PNG")
    result, _ = _split(tmp_path, [Row(raw=square.getvalue()), Row(raw=b""), Row(seed=1)])
    assert [(r.source_id, r.reason) for r in result.dropped] == [
        ("pairs-000000", BAD_LAYOUT),
        ("pairs-000001", MISSING_IMAGE),
    ]
    assert len(result.kept) == 2


def test_split_pair_reason_strings():
    assert (IMAGE_UNDECODABLE, IMAGE_TOO_LARGE, MISSING_IMAGE, BAD_LAYOUT, VIEW_TOO_SMALL, EMPTY_CAPTION) == (
        "image_undecodable",
        "image_too_large",
        "missing_image",
        "bad_layout",
        "view_too_small",
        "empty_caption",
    )


def test_split_pair_view_over_max_view_size_rejected_from_header(tmp_path):
    # 2·3000 + 3·0 by 3000: a valid pair layout, view side 3000 > the default 2048. Its pixel data
    # is a few bytes, so decoding it would fail as undecodable: the reason shows it never was.
    result, _ = _split(tmp_path, [Row(raw=png_header(6000, 3000)), Row(seed=1)])
    assert [(r.source_id, r.stage, r.reason, r.metric) for r in result.dropped] == [
        ("pairs-000000", "split", IMAGE_TOO_LARGE, 3000.0)
    ]
    assert "split.max_view_size 2048" in result.dropped[0].detail
    assert len(result.kept) == 2


def test_split_pair_max_view_size_from_settings(tmp_path):
    result, _ = _split(tmp_path, [Row(side=96, pad=16)], **{"split.max_view_size": 80})
    assert [(r.reason, r.metric) for r in result.dropped] == [(IMAGE_TOO_LARGE, 96.0)]


@pytest.mark.parametrize("width,height", [(16000, 8000), (24000, 12000)])
def test_split_pair_decompression_bomb_is_too_large_without_warning(tmp_path, width, height):
    # Above PIL's MAX_IMAGE_PIXELS (it would warn) and above twice it (it would raise), with
    # max_view_size out of the way: PIL's own limit still holds, as this reason.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, _ = _split(tmp_path, [Row(raw=png_header(width, height))], **{"split.max_view_size": 10**6})
    assert [r.reason for r in result.dropped] == [IMAGE_TOO_LARGE]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_split_pair_reject_details_have_no_memory_addresses(tmp_path):
    result, _ = _split(tmp_path, [Row(raw=b"GIF89a not an image at all"), Row(corrupt=True)])
    assert [r.reason for r in result.dropped] == [IMAGE_UNDECODABLE, IMAGE_UNDECODABLE]
    again, _ = _split(tmp_path, [Row(raw=b"GIF89a not an image at all"), Row(corrupt=True)])
    assert [r.detail for r in result.dropped] == [r.detail for r in again.dropped]
    assert all(r.detail and "0x" not in r.detail for r in result.dropped)


def test_quality_then_split_keeps_only_good_rows(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_subjects200k(path, [Row(seed=1), Row(scores=(5, 3, 5)), Row(valid=False)])
    ctx = StageContext(store=ArtifactStore(str(tmp_path / "store")))
    settings = BuildSettings()
    (batch,) = plan_batches([str(path)], batch_size=64)
    kept = filter_quality(read_source(batch, settings, ctx).kept, settings, ctx).kept
    assert [s.source_id for s in split_pair(kept, settings, ctx).kept] == ["pairs-000000"] * 2


# A `--until split` build (source -> quality -> split, the stage functions the flow runs) in a
# fresh process, which reports its peak resident memory.
_BUILD_UNTIL_SPLIT = """
import resource, sys
from refany3d.config import BuildSettings, override
from refany3d.stages.context import StageContext
from refany3d.stages.dag import stage_function
from refany3d.stages.read_source import plan_source
from refany3d.storage.store import ArtifactStore

data, out = sys.argv[1:]
settings = override(BuildSettings(), **{"source.kind": "subjects200k", "source.data_files": data,
                                        "until": "split", "storage.out": out})
ctx = StageContext(store=ArtifactStore(out + "/artifacts"), seed=0)
dropped = []
for batch in plan_source(settings):
    result = stage_function("source")(batch, settings, ctx)
    for stage in ("quality", "split"):
        result = stage_function(stage)(result.kept, settings, ctx)
        dropped += [r.reason for r in result.dropped]
print(",".join(dropped), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(tmp_path, name, rows):
    write_subjects200k(tmp_path / f"{name}.parquet", rows)
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_UNTIL_SPLIT, str(tmp_path / f"{name}.parquet"), str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DecompressionBomb" not in proc.stderr
    reasons, peak = proc.stdout.split()[-2:] if " " in proc.stdout.strip() else ("", proc.stdout)
    return reasons, int(peak)


@pytest.mark.slow
def test_split_pair_huge_pair_memory_within_twice_a_normal_file(tmp_path):
    # A 16000 x 8000 pair (two 8000 px views, 384 MB decoded, 1.7 MB as PNG) among normal rows.
    normal = [Row(side=512, pad=8, seed=i) for i in range(4)]
    huge = [*normal[:2], Row(raw=flat_png(16000, 8000)), *normal[2:]]
    _, budget = _peak_rss_kib(tmp_path, "normal", normal)
    reasons, peak = _peak_rss_kib(tmp_path, "huge", huge)
    assert reasons == IMAGE_TOO_LARGE
    assert peak <= 2 * budget, f"peak {peak / 1024:.0f} MiB > 2 x {budget / 1024:.0f} MiB"
