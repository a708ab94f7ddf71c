import base64
import io
import re

from PIL import Image

from refany3d.config import override
from refany3d.flows.artifacts import ORBIT_PX, gallery_markdown
from refany3d.stages.render import render
from refany3d.testing.posed import posed_samples


def test_gallery_markdown_shows_image_overlay_point_map_and_orbit_views(tmp_path):
    samples, ctx, settings = posed_samples(tmp_path, rows=1, size=96)
    settings = override(settings, **{"render.resolution": 64})
    rendered = render(samples[:1], settings, ctx).kept
    text = gallery_markdown("demo", rendered, ctx.store, uses_truth=True)
    header = next(line for line in text.splitlines() if line.startswith("| sample"))
    for column in ("image", "mask", "overlay", "point map", "orbit views"):
        assert f"| {column} |" in header + " |", column
    assert "ground-truth backends" in text
    uris = re.findall(r"\(data:image/jpeg;base64,([^)]+)\)", text)
    strip = Image.open(io.BytesIO(base64.b64decode(uris[-1])))
    assert strip.size == (8 * ORBIT_PX, 2 * ORBIT_PX)  # 8 RGB views over their 8 point maps
