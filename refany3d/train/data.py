"""Training data: shard rows streamed in a seeded block-shuffled order, split across ranks and workers.

Order. The index holds every row's (file, row group, row) from the Parquet metadata and the
`sample_id` column only. Epoch e visits the row groups in a permutation seeded by (seed, e) and the
rows of each group in their own seeded permutation ("block shuffle"), so a reader streams one row
group at a time. Global position k (over all epochs) is row k % n of epoch k // n.

Split. Micro-step m consumes global positions [m*W*B, (m+1)*W*B) for W ranks and micro-batch B;
rank r takes [m*W*B + r*B, m*W*B + (r+1)*B). Data-loader worker w of a rank builds the micro-batches
m with m % workers == w, which the loader hands out round-robin, so batches arrive in m order. The
data position of a checkpoint is the next global position: resuming on another W (or B) continues
the same global sequence.

Per-sample randomness (text / reference dropout, and the training noise in loop.py) is drawn from a
generator seeded by (seed, k), so it does not depend on W, B, workers or resumption.

Bad rows are skipped (never a crashed run) with one of the reasons below, logged and counted; a
micro-batch may come out short or empty.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from refany3d.config import DataSettings
from refany3d.storage.fs import url_to_fs
from refany3d.storage.store import join

logger = logging.getLogger("refany3d.train")

STAGE = "train_data"
# skip reasons (DESIGN: snake_case constants, each tested by its exact string)
ROW_UNREADABLE = "row_unreadable"  # the row's file or row group can no longer be read
IMAGE_MISSING = "image_missing"  # target image or target point map is null
IMAGE_CORRUPT = "image_corrupt"  # an image cell does not decode
VIEWS_MISSING = "views_missing"  # fewer orbit views (RGB or point map) than model.num_views

COLUMNS = ["sample_id", "caption", "image", "point_map", "views_rgb", "views_point_map"]


def shard_files(url: str) -> list[str]:
    """Sorted Parquet files of a dataset: a build directory (`URL/data/*.parquet`), a directory of
    shards, a glob, or one shard file; any fsspec URL."""
    fs, path = url_to_fs(url)
    protocol = url.split("://")[0] + "://" if "://" in url else ""
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isfile(path):
        found = [path]
    else:
        base = join(path, "data") if fs.isdir(join(path, "data")) else path
        found = fs.glob(join(base, "*.parquet")) if fs.isdir(base) else []
    files = sorted(p for p in found if p.endswith(".parquet") and "/.tmp-" not in p)
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in files]


@dataclass(frozen=True)
class RowRef:
    file: str
    group: int  # row group in the file
    row: int  # row within the group
    sample_id: str


def held_out(sample_id: str, fraction: float) -> bool:
    """Whether `sample_id` is in the evaluation split of `fraction`: a hash of the id alone, so a
    sample stays held out (or trained on) in every dataset version that has it."""
    digest = hashlib.sha256(f"holdout:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def build_index(files: list[str], holdout: float = 0.0, evaluation: bool = False) -> list[list[RowRef]]:
    """Row groups of every file, each a list of its rows (reads only `sample_id`): the training
    rows, or with `evaluation` the rows held out (`held_out(id, holdout)`); empty groups dropped."""
    groups = []
    for path in files:
        fs, p = url_to_fs(path)
        with fs.open(p, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            for g in range(parquet.num_row_groups):
                ids = parquet.read_row_group(g, columns=["sample_id"]).column(0).to_pylist()
                rows = [RowRef(path, g, i, sid) for i, sid in enumerate(ids)]
                rows = [r for r in rows if held_out(r.sample_id, holdout) == evaluation]
                if rows:
                    groups.append(rows)
    return groups


def epoch_order(groups: list[list[RowRef]], seed: int, epoch: int) -> list[RowRef]:
    """All rows of one epoch, block-shuffled (row groups, then rows inside each group)."""
    rng = np.random.default_rng([seed, epoch])
    order = []
    for g in rng.permutation(len(groups)):
        order += [groups[g][i] for i in rng.permutation(len(groups[g]))]
    return order


def sample_rng(seed: int, position: int, purpose: str) -> torch.Generator:
    """The generator of one global position (dropout, noise): same draw on any W, B or worker."""
    digest = hashlib.sha256(f"{seed}:{position}:{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def dropout(seed: int, position: int, settings: DataSettings) -> tuple[bool, bool]:
    """(drop the text, drop all reference views) for global position `position`."""
    u = torch.rand(2, generator=sample_rng(seed, position, "dropout"))
    return bool(u[0] < settings.drop_text_prob), bool(u[1] < settings.drop_references_prob)


# --------------------------------------------------------------------------- decoding


def content_key(row: dict, views: int) -> str:
    """Hash of exactly the cells the encoders read (caption, image, point map, the first `views`
    orbit views of each kind): the latent cache's key of a row. A rebuild that changes any of them
    under the same sample id gets a new key; the sample id itself is not part of it."""
    h = hashlib.sha256()

    def cell(value) -> None:
        data = b"" if value is None else (value.get("bytes") or b"")
        h.update(b"%d:" % (len(data) if value is not None else -1) + data)

    caption = (row.get("caption") or "").encode()
    h.update(b"%d:" % len(caption) + caption)
    cell(row.get("image"))
    cell(row.get("point_map"))
    for name in ("views_rgb", "views_point_map"):
        cells = row.get(name) or []
        h.update(b"%s:%d;" % (name.encode(), min(len(cells), views)))
        for value in cells[:views]:
            cell(value)
    return h.hexdigest()[:32]


@dataclass
class RawSample:
    """One decoded row. Images are (3, R, R) float32 in [-1, 1]; views (N, 3, Rc, Rc)."""

    sample_id: str
    caption: str
    image: torch.Tensor
    point_map: torch.Tensor
    views_rgb: torch.Tensor
    views_point_map: torch.Tensor


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _image(cell: dict | None, size: int, what: str) -> torch.Tensor:
    if cell is None or not cell.get("bytes"):
        raise SkipSample(IMAGE_MISSING, what)
    try:
        image = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - any decode failure is a corrupt cell
        raise SkipSample(IMAGE_CORRUPT, f"{what}: {err}") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _views(cells: list | None, views: int, size: int, what: str) -> torch.Tensor:
    if views == 0:
        return torch.zeros(0, 3, size, size)
    if not cells or len(cells) < views:
        raise SkipSample(VIEWS_MISSING, f"{what}: {len(cells or [])} < {views}")
    return torch.stack([_image(c, size, f"{what}[{i}]") for i, c in enumerate(cells[:views])])


def decode_row(row: dict, settings: DataSettings, views: int) -> RawSample:
    """A shard row -> RawSample at the data resolutions; raises SkipSample with the reason."""
    return RawSample(
        sample_id=row["sample_id"],
        caption=row.get("caption") or "",
        image=_image(row.get("image"), settings.resolution, "image"),
        point_map=_image(row.get("point_map"), settings.resolution, "point_map"),
        views_rgb=_views(row.get("views_rgb"), views, settings.condition_resolution, "views_rgb"),
        views_point_map=_views(
            row.get("views_point_map"), views, settings.condition_resolution, "views_point_map"
        ),
    )


# --------------------------------------------------------------------------- the stream


@dataclass
class Item:
    """One sample of a micro-batch: cached encodings (by key) or the decoded row to encode."""

    position: int
    sample_id: str
    cache_key: str
    drop_text: bool
    drop_references: bool
    cached: dict[str, torch.Tensor] | None = None
    raw: RawSample | None = None


@dataclass
class MicroBatch:
    step: int  # micro-step m
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (sample_id, reason, detail)


class _GroupReader:
    """Reads rows through a one-row-group cache (block-shuffled orders stay streaming)."""

    def __init__(self) -> None:
        self._key: tuple[str, int] | None = None
        self._rows: list[dict] = []

    def row(self, ref: RowRef) -> dict:
        if self._key != (ref.file, ref.group):
            self._key, self._rows = (ref.file, ref.group), []
            fs, p = url_to_fs(ref.file)
            with fs.open(p, "rb") as fh:
                parquet = pq.ParquetFile(fh)
                names = [c for c in COLUMNS if c in parquet.schema_arrow.names]
                self._rows = parquet.read_row_group(ref.group, columns=names).to_pylist()
        return self._rows[ref.row]


class TrainStream(torch.utils.data.IterableDataset):
    """Micro-batches of one rank from micro-step `start_step` on, forever (epochs roll over).

    `cache` (cache.LatentCache or None) is consulted in the workers, under `cache_key(content_key(row))`
    (the hash of the cells the encoders read): a hit loads the stored encodings and skips decoding.
    """

    def __init__(
        self,
        groups: list[list[RowRef]],
        settings: DataSettings,
        *,
        seed: int,
        views: int,
        batch_size: int,
        rank: int,
        world: int,
        start_step: int,
        cache=None,
        cache_key=None,
    ):
        self.groups, self.settings, self.seed, self.views = groups, settings, seed, views
        self.batch_size, self.rank, self.world, self.start_step = batch_size, rank, world, start_step
        self.cache, self.cache_key = cache, cache_key
        self.rows = sum(len(g) for g in groups)
        if not self.rows:
            raise ValueError("the dataset has no rows")

    def __iter__(self) -> Iterator[MicroBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader, orders = _GroupReader(), {}
        step = self.start_step + worker  # the loader takes worker 0's batch first, then 1's, ...
        while True:
            yield self._micro_batch(step, reader, orders)
            step += workers

    def _micro_batch(self, step: int, reader: _GroupReader, orders: dict) -> MicroBatch:
        batch = MicroBatch(step)
        first = step * self.world * self.batch_size + self.rank * self.batch_size
        for position in range(first, first + self.batch_size):
            epoch, index = divmod(position, self.rows)
            if epoch not in orders:  # keep the current epoch's order only
                orders.clear()
                orders[epoch] = epoch_order(self.groups, self.seed, epoch)
            ref = orders[epoch][index]
            drop_text, drop_refs = dropout(self.seed, position, self.settings)
            try:
                try:
                    row = reader.row(ref)
                except Exception as err:  # noqa: BLE001 - a vanished or broken file
                    raise SkipSample(ROW_UNREADABLE, f"{ref.file}#{ref.group}: {err}") from None
                key = self.cache_key(content_key(row, self.views))
                item = Item(position, ref.sample_id, key, drop_text, drop_refs)
                item.cached = self.cache.get(key) if self.cache is not None else None
                if item.cached is None:
                    item.raw = decode_row(row, self.settings, self.views)
            except SkipSample as skip:
                logger.warning("skipping sample %s: %s", ref.sample_id, skip)
                batch.skipped.append((ref.sample_id, skip.reason, skip.detail[:200]))
                continue
            batch.items.append(item)
        return batch
