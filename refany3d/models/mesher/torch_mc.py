"""Marching cubes in plain torch (CPU or CUDA): the `torch` surface extractor of `mesher.mc_algo`.

The triangle table is derived, not typed: on each cube face the iso-line segments cut off each
maximal run of inside corners (ambiguous faces therefore always separate their inside corners, a
rule that depends on the face's four corners only, so two cubes sharing a face agree and the mesh
is closed wherever the field is); a cube's segments chain into loops, each triangulated without a diagonal on a cube face
(one there could be drawn by the neighbour too).
Segments run with the inside on their left seen from outside the cube, so every surface edge is
used once in each direction by the two cubes around it: the winding is consistent, and it matches
`skimage.measure.marching_cubes` (hy3dgen's `mc`), so hy3dgen's face reversal makes it outward.

Vertices lie on the same grid edges, at the same linear interpolation, as skimage's; vertices on
shared edges are welded by the edge's global id. Volumes: (X, Y, Z) array index order, inside =
value > level; cubes with a NaN corner (outside FlashVDM's band) give no faces.
"""

from __future__ import annotations

import functools

import numpy as np

CORNERS = [(i & 1, (i >> 1) & 1, (i >> 2) & 1) for i in range(8)]  # corner i: (x, y, z) bits
EDGES = [(c, c | (1 << a)) for a in range(3) for c in range(8) if not c & (1 << a)]  # 12 (lo, hi)
EDGE_AXIS = [a for a in range(3) for c in range(8) if not c & (1 << a)]


def _face_cycles() -> list[list[int]]:
    """The 6 faces' corners, counter-clockwise seen from outside the cube."""
    cycles = []
    for a in range(3):
        b, c = (a + 1) % 3, (a + 2) % 3  # (b, c, a) is right-handed: this order is CCW from +a
        for side in (0, 1):
            ring = []
            for ub, uc in ((0, 0), (1, 0), (1, 1), (0, 1)):
                bits = [0, 0, 0]
                bits[a], bits[b], bits[c] = side, ub, uc
                ring.append(bits[0] | bits[1] << 1 | bits[2] << 2)
            cycles.append(ring if side else ring[::-1])
    return cycles


def _edge_of(c0: int, c1: int) -> int:
    return EDGES.index((min(c0, c1), max(c0, c1)))


def cube_loops(code: int) -> list[list[int]]:
    """The iso-surface of one cube configuration as closed loops of edge indices (0..11).

    `code` bit i set = corner i inside. Each loop runs counter-clockwise seen from the inside
    (the first half of the winding argument in the module docstring)."""
    inside = [bool(code >> i & 1) for i in range(8)]
    nxt: dict[int, int] = {}
    for ring in _face_cycles():
        flags = [inside[c] for c in ring]
        for k in range(4):
            if not flags[k] or flags[k - 1]:
                continue  # runs start at an inside corner after an outside one
            j = k
            while flags[(j + 1) % 4]:
                j += 1
            leave = _edge_of(ring[j % 4], ring[(j + 1) % 4])
            enter = _edge_of(ring[k - 1], ring[k])
            assert leave not in nxt, (code, leave)
            nxt[leave] = enter  # inside corners on the left, seen from outside the cube
    loops = []
    while nxt:
        start = min(nxt)
        loop = [start]
        while nxt[loop[-1]] != start:
            loop.append(nxt.pop(loop[-1]))
        nxt.pop(loop[-1])
        loops.append(loop)
    return loops


def _edge_faces(e: int) -> set[tuple[int, int]]:
    """The two cube faces, as (axis, side), that edge `e` lies on."""
    lo, a = CORNERS[EDGES[e][0]], EDGE_AXIS[e]
    return {(b, lo[b]) for b in range(3) if b != a}


def _triangulations(ring: list[int]):
    """Every triangulation of a polygon (its vertices in order), as lists of index triples."""
    if len(ring) < 3:
        yield []
        return
    first, last = ring[0], ring[-1]
    for k in range(1, len(ring) - 1):  # the triangle on the edge (first, last)
        for left in _triangulations(ring[: k + 1]):
            for right in _triangulations(ring[k:]):
                yield [*left, (first, ring[k], last), *right]


def _triangulate(loop: list[int]) -> list[tuple[int, int, int]]:
    """A triangulation of one loop with no diagonal lying on a cube face.

    On an ambiguous face the loop passes twice; a diagonal between its two segments would lie on
    the face, where the neighbouring cube may draw the same one: that edge would have 4 faces."""
    n = len(loop)
    for tris in _triangulations(list(range(n))):
        diagonals = {tuple(sorted(p)) for t in tris for p in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2]))}
        diagonals = {(i, j) for i, j in diagonals if (j - i) % n not in (1, n - 1)}
        if all(not _edge_faces(loop[i]) & _edge_faces(loop[j]) for i, j in diagonals):
            return [(loop[a], loop[b], loop[c]) for a, b, c in tris]
    raise AssertionError(f"no face-free triangulation of loop {loop}")


@functools.lru_cache(maxsize=1)
def triangle_table() -> tuple[np.ndarray, np.ndarray]:
    """(256, T, 3) int64 edge indices of each configuration's triangles (-1 padded), (256,) counts."""
    tris = [[t for lp in cube_loops(code) for t in _triangulate(lp)] for code in range(256)]
    width = max(len(t) for t in tris)
    table = np.full((256, width, 3), -1, np.int64)
    for code, t in enumerate(tris):
        if t:
            table[code, : len(t)] = t
    return table, np.array([len(t) for t in tris], np.int64)


def marching_cubes(volume, level: float = 0.0):
    """Iso-surface of a (X, Y, Z) torch volume at `level`, on the volume's device.

    Returns (V, 3) float32 vertices in index coordinates (x, y, z), and (F, 3) int64 faces wound
    like skimage's `marching_cubes` (reverse them for outward normals when inside > level)."""
    import torch

    vol = volume.float()
    dev = vol.device
    table, counts = (torch.from_numpy(t).to(dev) for t in triangle_table())
    sx, sy, sz = (n - 1 for n in vol.shape)
    code = torch.zeros((sx, sy, sz), dtype=torch.int32, device=dev)
    bad = torch.zeros((sx, sy, sz), dtype=torch.bool, device=dev)
    inside, nan = vol > level, vol.isnan()
    for i, (dx, dy, dz) in enumerate(CORNERS):
        window = (slice(dx, dx + sx), slice(dy, dy + sy), slice(dz, dz + sz))
        code |= inside[window].int() << i
        bad |= nan[window]
    code[bad] = 0
    cubes = ((code != 0) & (code != 255)).nonzero()  # (M, 3) cube origins, row-major order
    codes = code[cubes[:, 0], cubes[:, 1], cubes[:, 2]].long()
    n_tri = counts[codes]
    owner = torch.repeat_interleave(torch.arange(len(codes), device=dev), n_tri)
    slot = torch.arange(len(owner), device=dev) - (torch.cumsum(n_tri, 0) - n_tri)[owner]
    local = table[codes[owner], slot]  # (F, 3) edge indices of each triangle
    lo = torch.tensor([CORNERS[e[0]] for e in EDGES], device=dev)  # (12, 3) edge start offset
    axis = torch.tensor(EDGE_AXIS, device=dev)
    start = cubes[owner][:, None, :] + lo[local]  # (F, 3, 3) grid point where each edge starts
    gid = ((start[..., 0] * (sy + 1) + start[..., 1]) * (sz + 1) + start[..., 2]) * 3 + axis[local]
    gid, faces = torch.unique(gid.reshape(-1), return_inverse=True)  # weld shared edge vertices
    p = torch.stack(((gid // 3) // ((sy + 1) * (sz + 1)), (gid // 3) // (sz + 1) % (sy + 1),
                     (gid // 3) % (sz + 1)), dim=1)  # fmt: skip
    step = torch.nn.functional.one_hot(gid % 3, 3)
    q = p + step
    v0 = vol[p[:, 0], p[:, 1], p[:, 2]]
    v1 = vol[q[:, 0], q[:, 1], q[:, 2]]
    t = (level - v0) / (v1 - v0)
    verts = p.float() + t[:, None] * step.float()
    return verts, faces.reshape(-1, 3)
