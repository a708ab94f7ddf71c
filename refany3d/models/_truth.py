"""Shared pieces of the `truth` backends: ground truth of a view and a per-sample random stream."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

from refany3d.records import Sample

if TYPE_CHECKING:
    from refany3d.synthetic import TruthView

TRUTH_LABEL = "truth"  # what `sample.backends[...]` says for ground-truth-derived outputs


def truth_rng(seed: int, sample: Sample, role: str) -> np.random.Generator:
    """A generator fixed by (build seed, sample id, role): reruns and batch sizes give equal draws."""
    return np.random.default_rng([seed, zlib.crc32(sample.sample_id.encode()), zlib.crc32(role.encode())])


def read_view_truth(sample: Sample) -> TruthView:
    """Ground truth of a synthetic view sample; a clear error for rows of other sources."""
    if sample.source != "synthetic":
        raise ValueError(
            f"sample {sample.sample_id}: the `truth` backends need synthetic rows (source.kind=synthetic), "
            f"got source {sample.source!r}"
        )
    from refany3d import synthetic  # late: only truth runs need the synthetic source (trimesh, pyarrow)

    return synthetic.read_truth(sample.source_ref, sample.side)
