"""Procedural objects: composites of trimesh primitives with procedural textures.

Every object is one `trimesh.Trimesh` in its own frame (metres, y up, base on y = 0, centred on the
y axis) with one texture atlas (one tile per part), so it survives a GLB round trip unchanged.
Objects are deliberately asymmetric (handles, arms, labels) so that their pose is well defined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trimesh
from PIL import Image, ImageDraw, ImageFont

TILE = 128  # texture tile side in px, one tile per part

Rng = np.random.Generator


@dataclass(frozen=True)
class Part:
    mesh: trimesh.Trimesh
    texture: np.ndarray  # (TILE, TILE, 3) uint8


@dataclass(frozen=True)
class ObjectSpec:
    """A category of synthetic object, named like Subjects200K items."""

    item: str
    category: str
    build: Callable[[Rng], list[Part]]


# --------------------------------------------------------------------------- textures

_PALETTE = np.array(
    [
        [200, 40, 40], [230, 140, 30], [240, 210, 60], [60, 160, 70], [40, 110, 190], [110, 60, 160],
        [235, 235, 225], [40, 40, 45], [150, 100, 60], [190, 150, 100], [90, 150, 160], [210, 90, 140],
    ],
    dtype=np.uint8,
)  # fmt: skip


def _colors(rng: Rng, k: int = 2) -> np.ndarray:
    return _PALETTE[rng.choice(len(_PALETTE), size=k, replace=False)]


def _stripes(rng: Rng) -> np.ndarray:
    a, b = _colors(rng)
    period = int(rng.integers(8, 32))
    idx = (np.arange(TILE)[:, None] + (rng.random() < 0.5) * np.arange(TILE)[None, :]) // period % 2
    return np.where(idx[..., None] == 0, a, b).astype(np.uint8)


def _checks(rng: Rng) -> np.ndarray:
    a, b = _colors(rng)
    cell = int(rng.integers(10, 40))
    yy, xx = np.mgrid[:TILE, :TILE] // cell
    return np.where(((yy + xx) % 2 == 0)[..., None], a, b).astype(np.uint8)


def _grain(rng: Rng) -> np.ndarray:
    """Wood-like grain: a base colour modulated by warped sine rings."""
    base = _colors(rng, 1)[0].astype(np.float64)
    yy, xx = np.mgrid[:TILE, :TILE] / TILE
    rings = np.sin(2 * np.pi * (xx * rng.uniform(4, 10) + 0.3 * np.sin(2 * np.pi * yy * rng.uniform(1, 3))))
    return np.clip(base * (0.8 + 0.2 * rings[..., None]), 0, 255).astype(np.uint8)


def _label(rng: Rng) -> np.ndarray:
    """A printed label: coloured band with text and a logo disc (breaks the object's symmetry)."""
    a, b, c = _colors(rng, 3)
    img = Image.new("RGB", (TILE, TILE), tuple(int(v) for v in a))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, TILE // 3, TILE, 2 * TILE // 3], fill=tuple(int(v) for v in b))
    word = "".join(rng.choice(list("ABCDEFGHKLMNPRSTWXZ"), size=4))
    draw.text((6, TILE // 3 + 8), word, fill=tuple(int(v) for v in c), font=_font())
    r = TILE // 8
    draw.ellipse([TILE - 3 * r, 4, TILE - r, 4 + 2 * r], fill=tuple(int(v) for v in c))
    return np.asarray(img)


def _font():
    try:
        return ImageFont.load_default(size=28)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _noise(rng: Rng) -> np.ndarray:
    base = _colors(rng, 1)[0].astype(np.float64)
    coarse = rng.normal(0, 1, size=(8, 8))
    up = np.kron(coarse, np.ones((TILE // 8, TILE // 8)))
    return np.clip(base * (0.85 + 0.1 * up[..., None]), 0, 255).astype(np.uint8)


TEXTURES = {"stripes": _stripes, "checks": _checks, "grain": _grain, "label": _label, "noise": _noise}


def _tex(rng: Rng, *kinds: str) -> np.ndarray:
    return TEXTURES[kinds[int(rng.integers(len(kinds)))] if kinds else "noise"](rng)


# --------------------------------------------------------------------------- primitives


def _at(mesh: trimesh.Trimesh, xyz=(0.0, 0.0, 0.0), rot_deg=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    from scipy.spatial.transform import Rotation

    t = np.eye(4)
    t[:3, :3] = Rotation.from_euler("xyz", rot_deg, degrees=True).as_matrix()
    t[:3, 3] = xyz
    mesh.apply_transform(t)
    return mesh


def _box(size, xyz, rot=(0, 0, 0)) -> trimesh.Trimesh:
    return _at(trimesh.creation.box(extents=size), xyz, rot)


def _cyl(radius, height, xyz, rot=(-90, 0, 0), sections=32) -> trimesh.Trimesh:
    """Cylinder along y by default (trimesh's is along z)."""
    return _at(trimesh.creation.cylinder(radius=radius, height=height, sections=sections), xyz, rot)


def _cone(radius, height, xyz, rot=(-90, 0, 0)) -> trimesh.Trimesh:
    return _at(trimesh.creation.cone(radius=radius, height=height, sections=32), xyz, rot)


def _sphere(radius, xyz, scale=(1.0, 1.0, 1.0)) -> trimesh.Trimesh:
    m = trimesh.creation.icosphere(subdivisions=2, radius=radius)
    m.apply_scale(scale)
    return _at(m, xyz)


def _torus(major, minor, xyz, rot=(0, 0, 0)) -> trimesh.Trimesh:
    return _at(trimesh.creation.torus(major, minor, major_sections=32, minor_sections=12), xyz, rot)


# --------------------------------------------------------------------------- categories


def _mug(rng: Rng) -> list[Part]:
    r, h = rng.uniform(0.04, 0.055), rng.uniform(0.09, 0.12)
    return [
        Part(_cyl(r, h, (0, h / 2, 0)), _tex(rng, "stripes", "label", "checks")),
        Part(_torus(h * 0.28, r * 0.15, (r + h * 0.2, h / 2, 0)), _tex(rng)),
    ]


def _chair(rng: Rng) -> list[Part]:
    s, leg = rng.uniform(0.4, 0.5), rng.uniform(0.4, 0.48)
    wood = _tex(rng, "grain")
    legs = [Part(_box((0.04, leg, 0.04), (x * (s / 2 - 0.03), leg / 2, z * (s / 2 - 0.03))), wood)
            for x in (-1, 1) for z in (-1, 1)]  # fmt: skip
    seat = Part(_box((s, 0.04, s), (0, leg + 0.02, 0)), _tex(rng, "checks", "stripes", "noise"))
    back = Part(_box((s, rng.uniform(0.35, 0.5), 0.04), (0, leg + 0.25, -s / 2 + 0.02), (-8, 0, 0)), wood)
    return [*legs, seat, back]


def _lamp(rng: Rng) -> list[Part]:
    arm = rng.uniform(0.3, 0.45)
    return [
        Part(_cyl(0.09, 0.03, (0, 0.015, 0)), _tex(rng, "noise")),
        Part(_cyl(0.012, arm, (0.04, arm / 2, 0), (-90, 0, -8)), _tex(rng, "stripes")),
        Part(_cone(0.1, 0.14, (0.09, arm - 0.02, 0), (90, 0, 20)), _tex(rng, "checks", "label")),
    ]


def _bottle(rng: Rng) -> list[Part]:
    r, h = rng.uniform(0.035, 0.045), rng.uniform(0.18, 0.24)
    return [
        Part(_cyl(r, h, (0, h / 2, 0)), _tex(rng, "label")),
        Part(_cone(r, 0.06, (0, h, 0)), _tex(rng, "noise")),
        Part(_cyl(0.015, 0.03, (0, h + 0.06, 0)), _tex(rng, "stripes")),
        Part(_box((0.02, 0.05, 0.01), (r + 0.008, h * 0.6, 0)), _tex(rng)),  # clip on one side
    ]


def _desk(rng: Rng) -> list[Part]:
    w, d, hgt = rng.uniform(0.9, 1.2), rng.uniform(0.5, 0.6), rng.uniform(0.7, 0.76)
    wood = _tex(rng, "grain")
    parts = [Part(_box((w, 0.04, d), (0, hgt, 0)), wood)]
    parts += [Part(_box((0.05, hgt, 0.05), (x * (w / 2 - 0.05), hgt / 2, z * (d / 2 - 0.05))), wood)
              for x in (-1, 1) for z in (-1, 1)]  # fmt: skip
    parts.append(
        Part(_box((w * 0.35, hgt * 0.5, d * 0.9), (w * 0.28, hgt * 0.7, 0)), _tex(rng, "checks", "noise"))
    )
    return parts


def _toy_car(rng: Rng) -> list[Part]:
    length = rng.uniform(0.2, 0.28)
    wheel = _tex(rng, "stripes")
    parts = [
        Part(_box((length, 0.05, 0.1), (0, 0.045, 0)), _tex(rng, "stripes", "checks", "label")),
        Part(_box((length * 0.45, 0.045, 0.09), (-length * 0.12, 0.09, 0)), _tex(rng, "noise")),
    ]
    parts += [Part(_cyl(0.022, 0.02, (x * length * 0.33, 0.022, z * 0.055), (0, 0, 0), 24), wheel)
              for x in (-1, 1) for z in (-1, 1)]  # fmt: skip
    parts.append(Part(_box((0.02, 0.03, 0.02), (length * 0.42, 0.085, 0.03)), _tex(rng)))  # mirror
    return parts


def _backpack(rng: Rng) -> list[Part]:
    h = rng.uniform(0.4, 0.5)
    return [
        Part(_box((0.3, h, 0.16), (0, h / 2, 0)), _tex(rng, "noise", "checks")),
        Part(_box((0.22, h * 0.4, 0.06), (0, h * 0.3, 0.11)), _tex(rng, "stripes", "label")),
        Part(_torus(0.06, 0.012, (0, h + 0.02, -0.02), (0, 0, 0)), _tex(rng)),
        Part(_box((0.05, h * 0.7, 0.03), (0.1, h * 0.5, -0.095)), _tex(rng)),
    ]


def _kettle(rng: Rng) -> list[Part]:
    r = rng.uniform(0.09, 0.11)
    return [
        Part(_sphere(r, (0, r * 0.8, 0), (1.0, 0.8, 1.0)), _tex(rng, "stripes", "checks", "label")),
        Part(_cyl(0.015, 0.13, (r * 1.05, r * 0.9, 0), (0, 50, 0)), _tex(rng)),
        Part(_torus(r * 0.5, 0.013, (-r * 0.75, r * 1.1, 0)), _tex(rng, "noise")),
        Part(_cyl(r * 0.45, 0.025, (0, r * 1.6, 0)), _tex(rng, "noise")),
    ]


def _clock(rng: Rng) -> list[Part]:
    r = rng.uniform(0.06, 0.08)
    face = _cyl(r, 0.04, (0, r + 0.03, 0), (0, 0, 0))  # facing +z
    return [
        Part(face, _tex(rng, "label")),
        Part(_sphere(r * 0.35, (-r * 0.6, 2 * r + 0.03, 0)), _tex(rng)),
        Part(_sphere(r * 0.3, (r * 0.65, 2 * r + 0.02, 0)), _tex(rng)),
        Part(_box((0.012, 0.04, 0.012), (-r * 0.5, 0.02, 0)), _tex(rng)),
        Part(_box((0.012, 0.04, 0.012), (r * 0.5, 0.02, 0)), _tex(rng)),
        Part(_box((r * 0.8, 0.01, 0.006), (r * 0.35, r + 0.03, 0.023)), _tex(rng)),  # clock hand
    ]


def _plant(rng: Rng) -> list[Part]:
    h = rng.uniform(0.14, 0.2)
    return [
        Part(_cone(0.09, h * 1.6, (0, h * 1.6, 0), (90, 0, 0)), _tex(rng, "stripes", "checks")),
        Part(_cyl(0.008, 0.18, (0.02, h + 0.08, 0)), _tex(rng, "grain")),
        Part(_sphere(0.1, (0.05, h + 0.2, 0.02), (1.0, 0.8, 0.9)), _tex(rng, "noise")),
        Part(_sphere(0.06, (-0.07, h + 0.12, -0.02)), _tex(rng, "noise")),
    ]


def _robot(rng: Rng) -> list[Part]:
    s = rng.uniform(0.9, 1.2)
    body = _tex(rng, "checks", "stripes", "label")
    return [
        Part(_box((0.14 * s, 0.16 * s, 0.08 * s), (0, 0.18 * s, 0)), body),
        Part(_box((0.1 * s, 0.08 * s, 0.08 * s), (0, 0.31 * s, 0)), _tex(rng, "noise")),
        Part(_box((0.04 * s, 0.1 * s, 0.04 * s), (-0.035 * s, 0.05 * s, 0)), _tex(rng)),
        Part(_box((0.04 * s, 0.1 * s, 0.04 * s), (0.035 * s, 0.05 * s, 0)), _tex(rng)),
        Part(_box((0.03 * s, 0.13 * s, 0.03 * s), (0.09 * s, 0.2 * s, 0.03 * s), (40, 0, 0)), _tex(rng)),
        Part(_cyl(0.006 * s, 0.06 * s, (0.03 * s, 0.37 * s, 0)), _tex(rng)),  # antenna off centre
    ]


def _bookshelf(rng: Rng) -> list[Part]:
    w, h = rng.uniform(0.6, 0.8), rng.uniform(0.8, 1.1)
    wood = _tex(rng, "grain")
    parts = [Part(_box((0.03, h, 0.3), (x * w / 2, h / 2, 0)), wood) for x in (-1, 1)]
    parts += [Part(_box((w, 0.03, 0.3), (0, y, 0)), wood) for y in (0.015, h / 2, h - 0.015)]
    parts.append(Part(_box((w, h, 0.01), (0, h / 2, -0.15)), wood))
    n_books = int(rng.integers(3, 7))
    for i in range(n_books):
        bh = rng.uniform(0.18, 0.3)
        parts.append(
            Part(
                _box((0.04, bh, 0.2), (-w / 2 + 0.06 + i * 0.05, 0.03 + bh / 2, 0.02)),
                _tex(rng, "stripes", "label"),
            )
        )
    return parts


OBJECTS: tuple[ObjectSpec, ...] = (
    ObjectSpec("ceramic mug", "Kitchenware", _mug),
    ObjectSpec("wooden chair", "Furniture", _chair),
    ObjectSpec("table lamp", "Lighting", _lamp),
    ObjectSpec("water bottle", "Drinkware", _bottle),
    ObjectSpec("writing desk", "Furniture", _desk),
    ObjectSpec("toy car", "Toys", _toy_car),
    ObjectSpec("hiking backpack", "Bags", _backpack),
    ObjectSpec("electric kettle", "Kitchen Appliances", _kettle),
    ObjectSpec("alarm clock", "Home Decor", _clock),
    ObjectSpec("potted plant", "Plants", _plant),
    ObjectSpec("toy robot", "Toys", _robot),
    ObjectSpec("bookshelf", "Furniture", _bookshelf),
)


# --------------------------------------------------------------------------- assembly


def _planar_uv(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, np.ndarray]:
    """Unmerged copy of `mesh` with per-face planar UVs in [0, 1]: each face is projected along its
    dominant normal axis and scaled by the part's extent (no seams inside a face)."""
    tri = mesh.triangles  # (F, 3, 3)
    axis = np.abs(mesh.face_normals).argmax(axis=1)
    keep = np.array([[1, 2], [0, 2], [0, 1]])[axis]  # the two axes orthogonal to the dominant one
    lo, span = mesh.bounds[0], np.maximum(mesh.extents, 1e-9)
    coords = (tri - lo) / span
    uv = np.take_along_axis(coords, keep[:, None, :].repeat(3, axis=1), axis=2)
    faces = np.arange(len(tri) * 3).reshape(-1, 3)
    flat = trimesh.Trimesh(tri.reshape(-1, 3), faces, process=False)
    return flat, uv.reshape(-1, 2)


def assemble(parts: list[Part]) -> trimesh.Trimesh:
    """One textured mesh from parts: UVs per part, tiles packed into one square atlas."""
    cols = int(np.ceil(np.sqrt(len(parts))))
    atlas = np.zeros((cols * TILE, cols * TILE, 3), dtype=np.uint8)
    meshes, uvs = [], []
    margin = 2.0 / TILE  # keep bilinear lookups inside the tile
    for i, part in enumerate(parts):
        row, col = divmod(i, cols)
        atlas[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE] = part.texture
        flat, uv = _planar_uv(part.mesh)
        uv = margin + uv * (1 - 2 * margin)
        # texture v runs bottom-up (glTF flips rows on export/import consistently in trimesh)
        uvs.append(np.stack([(col + uv[:, 0]) / cols, 1.0 - (row + 1 - uv[:, 1]) / cols], axis=1))
        meshes.append(flat)
    mesh = trimesh.util.concatenate(meshes)
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(atlas), metallicFactor=0.0, roughnessFactor=0.9
    )
    mesh.visual = trimesh.visual.TextureVisuals(uv=np.concatenate(uvs), material=material)
    return mesh


def build_object(spec: ObjectSpec, rng: Rng) -> trimesh.Trimesh:
    """A textured mesh of `spec` in its own frame (metres, y up, base at y = 0, centred in x/z)."""
    mesh = assemble(spec.build(rng))
    lo, hi = mesh.bounds
    mesh.apply_translation([-(lo[0] + hi[0]) / 2, -lo[1], -(lo[2] + hi[2]) / 2])
    return mesh
