"""The training stream: block-shuffled order split over ranks and workers, dropout rates, skip reasons."""

from __future__ import annotations

import logging

import pytest
import torch

from refany3d.config import DataSettings
from refany3d.train import data
from tests.train._shards import write_dataset

SETTINGS = DataSettings(resolution=32, condition_resolution=32)


def _stream(groups, rank=0, world=1, batch=1, start=0, views=2, settings=SETTINGS):
    return data.TrainStream(
        groups, settings, seed=0, views=views, batch_size=batch, rank=rank, world=world,
        start_step=start, cache_key=lambda sid: sid,
    )  # fmt: skip


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_shard_files_accepts_build_dir_shard_dir_glob_and_one_file(dataset):
    files = data.shard_files(str(dataset))
    assert files and files == data.shard_files(str(dataset / "data")) == data.shard_files(
        str(dataset / "data" / "*.parquet")
    )
    assert data.shard_files(files[0]) == files[:1]


def test_epoch_order_visits_every_row_once_per_epoch_in_another_order(dataset):
    groups = data.build_index(data.shard_files(str(dataset)))
    ids = sorted(r.sample_id for g in groups for r in g)
    orders = [[r.sample_id for r in data.epoch_order(groups, 0, e)] for e in range(4)]
    assert all(sorted(o) == ids for o in orders)
    assert len({tuple(o) for o in orders}) > 1


def test_train_stream_ranks_split_each_global_batch_and_resume_continues_it(dataset):
    groups = data.build_index(data.shard_files(str(dataset)))
    single = [i.position for mb in _take(_stream(groups, batch=2), 4) for i in mb.items]
    ranks = [_take(_stream(groups, rank=r, world=2), 4) for r in range(2)]
    interleaved = [i.position for m in range(4) for r in range(2) for i in ranks[r][m].items]
    assert single == interleaved == list(range(8))
    # rank items hold the rows of the global order: all 4 samples in each epoch
    assert len({i.sample_id for r in range(2) for mb in ranks[r][:2] for i in mb.items}) == 4
    resumed = [i.position for mb in _take(_stream(groups, batch=2, start=2), 2) for i in mb.items]
    assert resumed == single[4:]


def test_train_stream_workers_yield_micro_batches_in_order(dataset):
    groups = data.build_index(data.shard_files(str(dataset)))
    loader = torch.utils.data.DataLoader(
        _stream(groups, start=3), batch_size=None, num_workers=2, collate_fn=lambda x: x
    )
    it = iter(loader)
    steps = [next(it).step for _ in range(5)]
    assert steps == [3, 4, 5, 6, 7]


def test_dropout_rates_follow_settings():
    settings = DataSettings(drop_text_prob=0.1, drop_references_prob=0.3)
    draws = [data.dropout(0, k, settings) for k in range(4000)]
    text = sum(d[0] for d in draws) / len(draws)
    refs = sum(d[1] for d in draws) / len(draws)
    assert abs(text - 0.1) < 0.015 and abs(refs - 0.3) < 0.025
    assert data.dropout(0, 7, settings) == data.dropout(0, 7, settings)  # a function of the position
    never = DataSettings(drop_text_prob=0.0, drop_references_prob=0.0)
    assert not any(any(data.dropout(0, k, never)) for k in range(200))


def _bad_rows(rows):
    """One row per skip reason (after the 4 good rows' first two)."""
    bad = [dict(r) for r in rows[:4]]
    bad[0]["image"] = None  # image_missing
    bad[1]["point_map"] = {"bytes": b"not a png", "path": None}  # image_corrupt
    bad[2]["views_rgb"] = bad[2]["views_rgb"][:1]  # views_missing
    for i, r in enumerate(bad):
        r["sample_id"] = f"bad-{i}"
    return bad


@pytest.mark.parametrize(
    ("index", "reason"),
    [(0, data.IMAGE_MISSING), (1, data.IMAGE_CORRUPT), (2, data.VIEWS_MISSING)],
)
def test_train_stream_skips_bad_row_with_reason(rows, tmp_path, index, reason, caplog):
    assert {data.IMAGE_MISSING, data.IMAGE_CORRUPT, data.VIEWS_MISSING, data.ROW_UNREADABLE} == {
        "image_missing", "image_corrupt", "views_missing", "row_unreadable",
    }  # fmt: skip
    root = write_dataset(tmp_path, [_bad_rows(rows)[index], rows[3]])
    groups = data.build_index(data.shard_files(str(root)))
    with caplog.at_level(logging.WARNING, logger="refany3d.train"):
        mbs = _take(_stream(groups), 2)
    skipped = [s for mb in mbs for s in mb.skipped]
    kept = [i.sample_id for mb in mbs for i in mb.items]
    assert [s[:2] for s in skipped] == [(f"bad-{index}", reason)]
    assert kept == [rows[3]["sample_id"]]
    assert reason in caplog.text


def test_train_stream_skips_vanished_file_as_row_unreadable(rows, tmp_path):
    root = write_dataset(tmp_path, rows[:2])
    groups = data.build_index(data.shard_files(str(root)))
    for f in data.shard_files(str(root)):
        (tmp_path / "data" / f.rsplit("/", 1)[-1]).unlink()
    mb = _take(_stream(groups), 1)[0]
    assert not mb.items and mb.skipped[0][1] == data.ROW_UNREADABLE


def test_decode_row_scales_images_to_minus_one_one(rows):
    raw = data.decode_row(rows[0], SETTINGS, views=2)
    assert raw.image.shape == (3, 32, 32) and raw.views_point_map.shape == (2, 3, 32, 32)
    assert raw.image.min() >= -1 and raw.image.max() <= 1 and raw.image.max() == 1  # white background
    assert raw.caption.startswith("A ")
