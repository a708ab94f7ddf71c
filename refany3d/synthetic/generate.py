"""Generate the synthetic source (placeholder until the renderer lands)."""

from __future__ import annotations


def generate(out_dir: str, n: int, seed: int) -> None:
    """Write `n` Subjects200K-format pair rows to `out_dir/data/` and their truth to `out_dir/truth/`."""
    raise NotImplementedError("synthetic generation lands with the renderer")


def ensure_synthetic(root: str, n: int, seed: int) -> str:
    """Generate into `root` unless a marker says the same (n, seed) is there; a glob of the data files."""
    raise NotImplementedError("synthetic generation lands with the renderer")
