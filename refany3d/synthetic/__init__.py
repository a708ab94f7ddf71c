"""The embedded synthetic source: Subjects200K-format rows with exact ground truth (DESIGN §3).

`generate(out_dir, n, seed)` writes `out_dir/data/*.parquet` (the real Subjects200K schema: padded
side-by-side pairs, captions, quality scores) and `out_dir/truth/<same name>.parquet`, one row per
view: `row`, `side`, `mesh_glb`, `pose` (16 floats, row-major object-to-camera, OpenCV),
`intrinsics` (9 floats, pixels of the S×S view), `mask` (PNG), `depth` (.npy float32 metres,
0 where empty). `read_truth(source_ref, side)` reads one view's ground truth back.
"""

from refany3d.synthetic.generate import ensure_synthetic, generate
from refany3d.synthetic.truth import TruthView, read_truth, truth_url

__all__ = ["TruthView", "ensure_synthetic", "generate", "read_truth", "truth_url"]
