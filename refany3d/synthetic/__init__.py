"""The embedded synthetic source: Subjects200K-format rows with exact ground truth (DESIGN §3).

`generate(out_dir, n, seed)` writes `out_dir/data/*.parquet` (the real Subjects200K schema: padded
side-by-side pairs, captions, quality scores) and `out_dir/truth/<same name>.parquet`, one row per
view: `row`, `side`, `mesh_glb`, `pose` (16 floats, row-major object-to-camera, OpenCV),
`intrinsics` (9 floats, pixels of the S×S view), `mask` (PNG), `depth` (.npy float32 metres,
0 where empty). `read_truth(source_ref, side)` reads one view's ground truth back.

Names load lazily, so `refany3d.synthetic.objects` imports without the Parquet stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "generate": "refany3d.synthetic.build",
    "ensure_synthetic": "refany3d.synthetic.build",
    "TruthView": "refany3d.synthetic.truth",
    "read_truth": "refany3d.synthetic.truth",
    "truth_url": "refany3d.synthetic.truth",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'refany3d.synthetic' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
