"""The built-in estimator's GPU path: the same search as `builtin` (coarse rotation search with
scaled ICP, ranked; a short render-and-compare screen; a full one to finish), with every pose
hypothesis of every sample of a batch in one set of tensors, and the ray casting done by
`raster.rasterize`. Chosen where `runtime.device` is a CUDA device; runs on any torch device
(the tests compare it with the CPU path on the CPU).

Per-sample tensors (`_Views`) are padded to the batch's largest mesh, grid, band and crop; every
hypothesis row carries `owner`, the index of its sample. Between phases the selection (which
hypotheses go on) is small and runs in numpy, as in `builtin`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from refany3d.config import PoseSettings
from refany3d.models.pose.base import PoseNotFound, PoseResult
from refany3d.models.pose.builtin import (
    SURFACE_CHECK,
    best_of,
    cube_turns,
    distinct_answers,
    distinct_poses,
    half_turns,
    sweep_starts,
)
from refany3d.models.pose.coarse import (
    ICP_SCHEDULE,
    RANK_DEPTH_TOLERANCE,
    VISIBLE_CELLS,
    fibonacci_sphere,
    front_hints,
    hint_start,
    rotation_hypotheses,
)
from refany3d.models.pose.model import CLOSEST_CELLS, PoseModel, Similarity
from refany3d.models.pose.observe import NoObservation, Observation, observe
from refany3d.models.pose.raster import Lattice, rasterize
from refany3d.models.pose.refine import (
    DAMPING,
    MAX_OFFSET_PX,
    MAX_ROTATION_STEP,
    MAX_SCALE_STEP,
    OFFSET_PRIOR,
    OFFSET_SIGMA_PX,
    answer_margin,
    depth_tau,
)

HYPOTHESES_PER_RASTER = 256  # hypotheses rasterised at once in the coarse ranking (memory)
_NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _pad(arrays: list[np.ndarray], fill: float = 0.0) -> np.ndarray:
    """Stack arrays that differ in their first dimension, padded with `fill`."""
    size = max(len(a) for a in arrays)
    out = np.full((len(arrays), size) + arrays[0].shape[1:], fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


class _Views:
    """The batch's samples on the device: meshes, observations, padded to common sizes."""

    def __init__(
        self, models: list[PoseModel], observations: list[Observation], device: torch.device
    ) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.device = device
        self.models, self.observations = models, observations
        self.tri = torch.tensor(_pad([m.vertices[m.faces] for m in models], np.nan), **f64)
        self.face_normals = torch.tensor(_pad([m.face_normals for m in models]), **f64)
        self.radius = torch.tensor([m.radius for m in models], **f64)
        self.center = torch.tensor(np.stack([m.center for m in models]), **f64)
        self.surface = torch.tensor(np.stack([m.surface for m in models]), **f64)
        self.k = torch.tensor(np.stack([o.intrinsics for o in observations]), **f64)
        self.noise = torch.tensor([o.depth_noise for o in observations], **f64)
        self._crops(observations, device)
        self._closest_grids()

    def _crops(self, observations: list[Observation], device: torch.device) -> None:
        """Per sample: the grid (as a lattice and as crop indices), the band pixels with their
        neighbours, and a full-resolution crop around both."""
        grids, crops = [], []
        for obs in observations:
            h, w = obs.mask.shape
            u0, v0 = obs.grid_uv.min(axis=0).astype(np.int64)
            u1, v1 = obs.grid_uv.max(axis=0).astype(np.int64)
            grids.append((u0, v0, obs.step, (v1 - v0) // obs.step + 1, (u1 - u0) // obs.step + 1))
            # The crop holds the grid, the band and one pixel more (the band's neighbours).
            cu0, cv0 = max(0, u0 - 1), max(0, v0 - 1)
            crops.append((cu0, cv0, min(h - 1, v1 + 1) - cv0 + 1, min(w - 1, u1 + 1) - cu0 + 1))
        width = max(c[3] for c in crops)  # crop pixel (u, v) is at (v - v0) * width + (u - u0)
        bands, neighbours = [], []
        grid_at, grid_depth, grid_mask, band_sdf, band_grad, band_obs = [], [], [], [], [], []
        for obs, (cu0, cv0, _, _) in zip(observations, crops, strict=True):
            h, w = obs.mask.shape
            gi = obs.grid_uv.astype(np.int64)
            grid_at.append((gi[:, 1] - cv0) * width + (gi[:, 0] - cu0))
            grid_depth.append(obs.grid_depth)
            grid_mask.append(obs.grid_mask)
            bi = obs.band_uv.astype(np.int64)
            bands.append((bi[:, 1] - cv0) * width + (bi[:, 0] - cu0))
            nb = []
            for du, dv in _NEIGHBOURS:  # clipped to the image, as `refine` does
                nu, nv = np.clip(bi[:, 0] + du, 0, w - 1), np.clip(bi[:, 1] + dv, 0, h - 1)
                nb.append((nv - cv0) * width + (nu - cu0))
            neighbours.append(np.stack(nb, axis=1))
            band_sdf.append(obs.sdf[bi[:, 1], bi[:, 0]].astype(np.float64))
            band_grad.append(obs.sdf_grad[:, bi[:, 1], bi[:, 0]].T.astype(np.float64))
            band_obs.append(obs.mask[bi[:, 1], bi[:, 0]])
        f64 = dict(dtype=torch.float64, device=device)
        long = dict(dtype=torch.int64, device=device)
        g = np.array(grids)
        self.grid = Lattice(
            torch.tensor(g[:, :2], **f64), torch.tensor(g[:, 2], **f64), torch.tensor(g[:, 3], **long),
            torch.tensor(g[:, 4], **long), (int(g[:, 3].max()), int(g[:, 4].max())),
        )  # fmt: skip
        c = np.array(crops)
        self.crop = Lattice(
            torch.tensor(c[:, :2], **f64), torch.ones(len(c), **f64), torch.tensor(c[:, 2], **long),
            torch.tensor(c[:, 3], **long), (int(c[:, 2].max()), int(c[:, 3].max())),
        )  # fmt: skip
        self.grid_valid = torch.tensor(_pad([np.ones(len(a), bool) for a in grid_at], False), device=device)
        self.grid_at = torch.tensor(_pad(grid_at), **long)
        self.grid_depth = torch.tensor(_pad(grid_depth), **f64)
        self.grid_mask = torch.tensor(_pad(grid_mask, False), device=device)
        self.band_valid = torch.tensor(_pad([np.ones(len(b), bool) for b in bands], False), device=device)
        self.band_at = torch.tensor(_pad(bands), **long)
        self.band_neighbours = torch.tensor(_pad(neighbours), **long)
        self.band_sdf = torch.tensor(_pad(band_sdf), **f64)
        self.band_grad = torch.tensor(_pad(band_grad), **f64)
        self.band_obs = torch.tensor(_pad(band_obs, False), device=device)
        rows, cols = self.crop.shape
        self.crop_mask = torch.zeros((len(crops), rows * cols), dtype=torch.bool, device=device)
        self.crop_band = torch.zeros_like(self.crop_mask)
        for i, (obs, (cu0, cv0, crows, ccols)) in enumerate(zip(observations, crops, strict=True)):
            window = obs.mask[cv0 : cv0 + crows, cu0 : cu0 + ccols]
            full = np.zeros((rows, cols), bool)
            full[:crows, :ccols] = window
            self.crop_mask[i] = torch.from_numpy(full.reshape(-1)).to(device)
            self.crop_band[i, self.band_at[i, : len(bands[i])]] = True
        self.mask_area = torch.tensor([float(o.mask.sum()) for o in observations], **f64)
        self.grid_rays = self._rays(self.grid_at, self.crop)
        self.band_rays = self._rays(self.band_at, self.crop)
        self.grid_q = self.grid_rays * self.grid_depth[..., None]

    def _rays(self, at: torch.Tensor, lattice: Lattice) -> torch.Tensor:
        """(s, n, 3) camera rays (z = 1) through the crop pixels `at` (s, n) of each sample."""
        cols = lattice.shape[1]
        u = lattice.origin[:, None, 0] + (at % cols).to(torch.float64)
        v = lattice.origin[:, None, 1] + (at // cols).to(torch.float64)
        k = self.k
        x = (u - k[:, None, 0, 2]) / k[:, None, 0, 0]
        y = (v - k[:, None, 1, 2]) / k[:, None, 1, 1]
        return torch.stack([x, y, torch.ones_like(x)], dim=-1)

    def _closest_grids(self) -> None:
        """Per sample, the nearest surface sample of each cell centre of a cube grid around the
        mesh: `PoseModel.closest`'s table. On a GPU a brute-force search beats building it on the
        CPU (a k-d tree query); elsewhere the model's own table is used."""
        half = 1.6 * self.radius
        self.grid_lo = self.center - half[:, None]
        self.grid_cell = 2.0 * half / CLOSEST_CELLS
        if self.device.type != "cuda":
            tables = [torch.from_numpy(m.closest_table) for m in self.models]
            self.closest_index = torch.stack(tables).to(self.device)
            return
        steps = torch.arange(CLOSEST_CELLS, dtype=torch.float64, device=self.device) + 0.5
        index = []
        for i in range(len(self.radius)):
            axis = self.grid_lo[i][None] + steps[:, None] * self.grid_cell[i]
            cells = torch.stack(torch.meshgrid(axis[:, 0], axis[:, 1], axis[:, 2], indexing="ij"), -1)
            cells = cells.reshape(-1, 3)
            index.append(
                torch.cat([torch.cdist(c, self.surface[i]).argmin(dim=1) for c in cells.split(8192)])
            )
        self.closest_index = torch.stack(index)

    def closest(self, owner: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((h, n, 3) nearest surface sample of each (h, n, 3) mesh-frame point of hypothesis h,
        (h, n) whether the point lies inside the grid)."""
        cells = CLOSEST_CELLS
        ijk = torch.floor((points - self.grid_lo[owner, None]) / self.grid_cell[owner, None, None])
        ijk = ijk.to(torch.int64)
        inside = ((ijk >= 0) & (ijk < cells)).all(dim=-1)
        ijk = ijk.clamp(0, cells - 1)
        flat = (ijk[..., 0] * cells + ijk[..., 1]) * cells + ijk[..., 2]
        # Flat indices into all samples' tables: gathering a table per hypothesis would copy it.
        nearest = self.closest_index.reshape(-1)[owner[:, None] * cells**3 + flat]
        surface = self.surface.reshape(-1, 3)[owner[:, None] * self.surface.shape[1] + nearest]
        return surface, inside


@dataclass
class _Poses:
    """h similarity hypotheses: rotation (h, 3, 3), scale (h,), translation (h, 3), owner (h,)."""

    rotation: torch.Tensor
    scale: torch.Tensor
    translation: torch.Tensor
    owner: torch.Tensor

    @classmethod
    def of(cls, poses: list[Similarity], owner: list[int], device: torch.device) -> _Poses:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            torch.tensor(np.stack([p.rotation for p in poses]), **f64),
            torch.tensor([p.scale for p in poses], **f64),
            torch.tensor(np.stack([p.translation for p in poses]), **f64),
            torch.tensor(owner, dtype=torch.int64, device=device),
        )

    def take(self, index: torch.Tensor) -> _Poses:
        """The hypotheses at `index` (a tensor of rows)."""
        return _Poses(self.rotation[index], self.scale[index], self.translation[index], self.owner[index])

    def where(self, chosen: torch.Tensor, other: _Poses) -> _Poses:
        """Per hypothesis, this pose where (h,) `chosen`, else `other`'s."""
        return _Poses(
            torch.where(chosen[:, None, None], self.rotation, other.rotation),
            torch.where(chosen, self.scale, other.scale),
            torch.where(chosen[:, None], self.translation, other.translation),
            self.owner,
        )

    def similarities(self) -> list[Similarity]:
        r, s, t = (x.cpu().numpy() for x in (self.rotation, self.scale, self.translation))
        return [Similarity(r[i], float(s[i]), t[i]) for i in range(len(s))]


def _screen(views: _Views, poses: _Poses) -> torch.Tensor:
    """(h, f, 3, 3) float32 (u, v, z) of every triangle of each hypothesis' mesh, posed."""
    tri = views.tri[poses.owner]  # (h, f, 3, 3) mesh frame
    cam = poses.scale[:, None, None, None] * torch.einsum("hij,hfcj->hfci", poses.rotation, tri)
    cam = cam + poses.translation[:, None, None, :]
    k = views.k[poses.owner]
    z = cam[..., 2]
    u = k[:, None, None, 0, 0] * cam[..., 0] / z + k[:, None, None, 0, 2]
    v = k[:, None, None, 1, 1] * cam[..., 1] / z + k[:, None, None, 1, 2]
    return torch.stack([u, v, z], dim=-1).to(torch.float32)


def _lattice_of(lattice: Lattice, owner: torch.Tensor) -> Lattice:
    return Lattice(
        lattice.origin[owner],
        lattice.stride[owner],
        lattice.rows[owner],
        lattice.columns[owner],
        lattice.shape,
    )


@dataclass
class _Hits:
    """Ray-cast results at n pixels per hypothesis: hit (h, n), depth (h, n) float64, normals
    (h, n, 3) camera frame, facing the ray."""

    hit: torch.Tensor
    depth: torch.Tensor
    normals: torch.Tensor


def _cast(views: _Views, poses: _Poses) -> tuple[_Hits, _Hits]:
    """The hypotheses cast at full resolution over their sample's crop: (grid hits, band hits)."""
    raster = rasterize(_screen(views, poses), _lattice_of(views.crop, poses.owner))
    depth = raster.depth.reshape(len(poses.scale), -1).to(torch.float64)
    face = raster.face.reshape(len(poses.scale), -1)
    return (
        _hits_at(views, poses, depth, face, views.grid_at, views.grid_rays),
        _hits_at(views, poses, depth, face, views.band_at, views.band_rays),
    )


def _hits_at(views, poses, depth, face, at, rays) -> _Hits:
    o = poses.owner
    index = at[o]
    d = torch.gather(depth, 1, index)
    f = torch.gather(face, 1, index)
    hit = f >= 0
    normals = torch.gather(views.face_normals[o], 1, f.clamp(min=0)[..., None].expand(-1, -1, 3))
    normals = torch.einsum("hij,hnj->hni", poses.rotation, normals)
    flip = (normals * rays[o]).sum(-1) > 0  # face the ray (open or flipped meshes)
    normals = torch.where(flip[..., None], -normals, normals)
    return _Hits(hit, torch.where(hit, d, 0.0), torch.where(hit[..., None], normals, 0.0))


def _evaluate(views: _Views, poses: _Poses, hits, offset: torch.Tensor, depth_tol: float = 0.02):
    """(iou, depth agreement) per hypothesis: `refine.evaluate` batched."""
    grid, band = hits
    o = poses.owner
    valid = views.band_valid[o]
    shifted = (views.band_sdf[o] < offset[:, None]) & valid
    area = views.mask_area[o] - (views.band_obs[o] & valid).sum(1) + shifted.sum(1)
    miss = (shifted & ~band.hit).sum(1)
    extra = (~shifted & band.hit & valid).sum(1)
    iou = (area - miss) / (area + extra)
    observed = (views.grid_depth[o] > 0) & views.grid_valid[o]
    tau = torch.hypot(depth_tol * poses.scale * views.radius[o], 2.0 * views.noise[o])
    residual = (grid.depth - views.grid_depth[o]) / tau[:, None]
    agree = torch.where(grid.hit & observed, torch.exp(-0.5 * residual**2), 0.0).sum(1)
    agreement = torch.where(observed.any(1), agree / observed.sum(1).clamp(min=1), 0.0)
    return iou, agreement


def _contour(views: _Views, owner: torch.Tensor, band_hit: torch.Tensor) -> torch.Tensor:
    """(h, b) band pixels inside the rendered silhouette with a 4-neighbour outside it; off the
    band a pixel takes the mask's value (`refine._Casts.contour`)."""
    h = len(owner)
    rendered = views.crop_mask[owner].clone()
    rows = torch.arange(h, device=owner.device)[:, None].expand_as(band_hit)
    valid = views.band_valid[owner]
    rendered[rows[valid], views.band_at[owner][valid]] = band_hit[valid]
    nb = views.band_neighbours[owner]  # (h, b, 4)
    outside = ~torch.gather(rendered, 1, nb.reshape(h, -1)).reshape(nb.shape)
    return outside.any(-1) & band_hit & valid


def _weights(residual: torch.Tensor, scale: float, cauchy: bool) -> torch.Tensor:
    if cauchy:
        return 1.0 / (1.0 + (residual / scale) ** 2)
    a = residual.abs()
    return torch.where(a <= scale, 1.0, scale / a.clamp(min=1e-12))


def _point_rows(n: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """(h, m, 7) n · ∂p/∂(ω, σ, δ) of the update p' = exp(σ) Exp(ω) (p - t) + t + δ."""
    return torch.cat([torch.cross(rel, n, dim=-1), (n * rel).sum(-1, keepdim=True), n], dim=-1)


def _normal_equations(views, poses, offset, hits, depth_sigma, sil_sigma, redescend):
    """(h, 8, 8) JᵀWJ and (h, 8) JᵀWr: `refine._normal_equations` batched."""
    grid, band = hits
    o = poses.owner
    h = len(o)
    dev = o.device
    h_sum = torch.zeros((h, 8, 8), dtype=torch.float64, device=dev)
    g_sum = torch.zeros((h, 8), dtype=torch.float64, device=dev)
    h_sum[:, 7, 7] = OFFSET_PRIOR / OFFSET_SIGMA_PX**2
    g_sum[:, 7] = OFFSET_PRIOR / OFFSET_SIGMA_PX**2 * offset
    size = (poses.scale * views.radius[o])[:, None]
    t = poses.translation[:, None, :]
    sel = grid.hit & (views.grid_depth[o] > 0) & views.grid_valid[o]
    p = views.grid_rays[o] * grid.depth[..., None]
    r = (grid.normals * (p - views.grid_q[o])).sum(-1) / size
    jac = _point_rows(grid.normals, p - t) / size[..., None]
    w = _weights(r, 1.5 * depth_sigma, False) / depth_sigma**2 / sel.sum(1, keepdim=True).clamp(min=1)
    w = torch.where(sel, w, 0.0)
    h_sum[:, :7, :7] += torch.einsum("hni,hn,hnj->hij", jac, w, jac)
    g_sum[:, :7] += torch.einsum("hni,hn->hi", jac, w * r)

    edge = _contour(views, o, band.hit)
    k = views.k[o]
    p = views.band_rays[o] * band.depth[..., None]
    z = p[..., 2].clamp(min=1e-9)
    grad = views.band_grad[o]
    fx, fy = k[:, None, 0, 0], k[:, None, 1, 1]
    # grad · ∂(u, v)/∂p of the pinhole projection.
    g3 = torch.stack(
        [grad[..., 0] * fx / z, grad[..., 1] * fy / z, -(grad[..., 0] * fx * p[..., 0] + grad[..., 1] * fy * p[..., 1]) / z**2],
        dim=-1,
    )  # fmt: skip
    g3 = torch.where(edge[..., None], g3, 0.0)  # a missed pixel's depth 0 would blow the row up
    jac = torch.cat([_point_rows(g3, p - t), -torch.ones_like(z)[..., None]], dim=-1)
    r = views.band_sdf[o] - offset[:, None]
    w = _weights(r, 1.5 * sil_sigma, redescend) / sil_sigma**2 / edge.sum(1, keepdim=True).clamp(min=1)
    w = torch.where(edge, w, 0.0)
    h_sum += torch.einsum("hni,hn,hnj->hij", jac, w, jac)
    g_sum += torch.einsum("hni,hn->hi", jac, w * r)
    return h_sum, g_sum


def _exp_so3(w: torch.Tensor) -> torch.Tensor:
    """(h, 3, 3) rotations of (h, 3) axis-angle vectors (Rodrigues)."""
    angle = w.norm(dim=-1, keepdim=True)
    axis = w / angle.clamp(min=1e-12)
    k = torch.zeros(w.shape[:-1] + (3, 3), dtype=w.dtype, device=w.device)
    k[..., 0, 1], k[..., 0, 2] = -axis[..., 2], axis[..., 1]
    k[..., 1, 0], k[..., 1, 2] = axis[..., 2], -axis[..., 0]
    k[..., 2, 0], k[..., 2, 1] = -axis[..., 1], axis[..., 0]
    a = angle[..., None]
    return torch.eye(3, dtype=w.dtype, device=w.device) + torch.sin(a) * k + (1 - torch.cos(a)) * k @ k


def _step(poses: _Poses, delta: torch.Tensor, size: torch.Tensor) -> _Poses:
    """`refine._step` batched: the update, each part clamped."""
    w, sigma, shift = delta[:, 0:3], delta[:, 3], delta[:, 4:7]
    angle = w.norm(dim=1, keepdim=True)
    w = torch.where(angle > MAX_ROTATION_STEP, w * MAX_ROTATION_STEP / angle.clamp(min=1e-12), w)
    sigma = sigma.clamp(-MAX_SCALE_STEP, MAX_SCALE_STEP)
    norm = shift.norm(dim=1, keepdim=True)
    limit = 0.2 * size[:, None]
    shift = torch.where(norm > limit, shift * limit / norm.clamp(min=1e-30), shift)
    return _Poses(
        _exp_so3(w) @ poses.rotation, poses.scale * torch.exp(sigma), poses.translation + shift, poses.owner
    )


@dataclass
class _Fits:
    """The best iterate of each hypothesis' refinement."""

    poses: _Poses
    iou: torch.Tensor
    agreement: torch.Tensor

    @property
    def score(self) -> torch.Tensor:
        return self.iou * self.agreement


def _refine(views: _Views, start: _Poses, iterations: int, depth_sigma: float, sil_sigma: float) -> _Fits:
    """`refine.refine` for every hypothesis at once; a hypothesis stops where its own would
    (converged, or a singular system), the others go on."""
    poses = start
    offset = torch.zeros_like(start.scale)
    hits = _cast(views, poses)
    iou, agreement = _evaluate(views, poses, hits, offset)
    best = _Fits(poses, iou, agreement)
    active = torch.ones_like(offset, dtype=torch.bool)
    for step in range(iterations):
        redescend = step >= iterations // 2 and iterations >= 8
        h_mat, g_vec = _normal_equations(views, poses, offset, hits, depth_sigma, sil_sigma, redescend)
        diag = torch.diagonal(h_mat, dim1=1, dim2=2)
        damped = h_mat + DAMPING * torch.diag_embed(diag + 1e-9)
        solution, info = torch.linalg.solve_ex(damped, g_vec[..., None])
        active &= info == 0
        delta = torch.where(active[:, None], -solution[..., 0], 0.0)
        size = poses.scale * views.radius[poses.owner]
        stepped = _step(poses, delta[:, :7], size)
        poses = stepped.where(active, poses)
        offset = torch.where(active, (offset + delta[:, 7]).clamp(-MAX_OFFSET_PX, MAX_OFFSET_PX), offset)
        hits = _cast(views, poses)
        iou, agreement = _evaluate(views, poses, hits, offset)
        better = active & (iou * agreement > best.score)
        best = _Fits(
            poses.where(better, best.poses),
            torch.where(better, iou, best.iou),
            torch.where(better, agreement, best.agreement),
        )
        converged = (delta[:, :4].abs().amax(1) < 1e-4) & (delta[:, 4:7].norm(dim=1) < 1e-4 * size)
        active &= ~converged
        if not bool(active.any()):
            break
    return best


# Coarse search ----------------------------------------------------------------------------------


def _lateral_rms(
    points: torch.Tensor, weight: torch.Tensor, axis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS distance across unit `axis` (.., 3) of the weighted points (.., n, 3) from their
    centroid, the centroid)."""
    total = weight.sum(-1).clamp(min=1e-12)
    mean = (weight[..., None] * points).sum(-2) / total[..., None]
    rel = points - mean[..., None, :]
    rel = rel - (rel * axis[..., None, :]).sum(-1, keepdim=True) * axis[..., None, :]
    return torch.sqrt((weight * (rel**2).sum(-1)).sum(-1) / total), mean


def _visible(views: _Views, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and view direction, the mesh points seen from far along it on a
    `VISIBLE_CELLS`² orthographic grid (`PoseModel.cast_orthographic`): (s, d, cells², 3) points
    and (s, d, cells²) whether each grid ray hit."""
    s, d = len(views.radius), len(directions)
    cells = VISIBLE_CELLS
    helper = torch.where(
        (directions[:, 0].abs() < 0.9)[:, None],
        torch.tensor([1.0, 0.0, 0.0], dtype=directions.dtype, device=directions.device),
        torch.tensor([0.0, 1.0, 0.0], dtype=directions.dtype, device=directions.device),
    )
    a = torch.cross(helper, directions, dim=-1)
    a = a / a.norm(dim=-1, keepdim=True)
    b = torch.cross(directions, a, dim=-1)
    r = views.radius[:, None, None, None]
    rel = views.tri[:, None] - views.center[:, None, None, None, :]  # (s, 1, f, 3, 3)
    spacing = 2.0 * r / (cells - 1)
    u = ((rel * a[None, :, None, None]).sum(-1) + r) / spacing
    v = ((rel * b[None, :, None, None]).sum(-1) + r) / spacing
    z = 2.0 * r - (rel * directions[None, :, None, None]).sum(-1)
    screen = torch.stack([u, v, z], dim=-1).reshape(s * d, -1, 3, 3).to(torch.float32)
    n = s * d
    dev = views.device
    lattice = Lattice(
        torch.zeros((n, 2), dtype=torch.float64, device=dev), torch.ones(n, dtype=torch.float64, device=dev),
        torch.full((n,), cells, device=dev), torch.full((n,), cells, device=dev), (cells, cells),
    )  # fmt: skip
    raster = rasterize(screen, lattice, perspective=False)
    hit = raster.hit.reshape(s, d, -1)
    t_hit = raster.depth.reshape(s, d, -1).to(torch.float64)
    span = torch.linspace(-1.0, 1.0, cells, dtype=torch.float64, device=dev)
    gv, gu = torch.meshgrid(span, span, indexing="ij")
    gu, gv = gu.reshape(-1), gv.reshape(-1)
    rad = views.radius[:, None, None, None]
    origins = views.center[:, None, None, :] + 2.0 * rad * directions[None, :, None, :]
    origins = origins + rad * (
        gu[None, None, :, None] * a[None, :, None, :] + gv[None, None, :, None] * b[None, :, None, :]
    )
    return origins - directions[None, :, None, :] * t_hit[..., None], hit


def _initial_poses(
    views: _Views, clouds: torch.Tensor, cloud_valid: torch.Tensor, opts: PoseSettings
) -> _Poses:
    """`coarse.initial_poses` for every sample: a similarity per rotation hypothesis."""
    dev = views.device
    rots, index = rotation_hypotheses(opts.view_directions, opts.in_plane_steps)
    directions = torch.tensor(fibonacci_sphere(opts.view_directions), dtype=torch.float64, device=dev)
    weight = cloud_valid.to(torch.float64)
    centre = (weight[..., None] * clouds).sum(1) / weight.sum(1, keepdim=True)
    radius, _ = _lateral_rms(clouds, weight, centre / centre.norm(dim=-1, keepdim=True))
    points, hit = _visible(views, directions)
    seen_rms, seen_mean = _lateral_rms(
        points, hit.to(torch.float64), directions[None].expand(len(radius), -1, -1)
    )
    few = hit.sum(-1) < 8  # too little seen: the whole surface instead
    all_rms, all_mean = _lateral_rms(
        views.surface[:, None].expand(-1, len(directions), -1, -1),
        torch.ones(views.surface.shape[:2], dtype=torch.float64, device=dev)[:, None].expand(-1, len(directions), -1),
        directions[None].expand(len(radius), -1, -1),
    )  # fmt: skip
    seen_rms = torch.where(few, all_rms, seen_rms)
    seen_mean = torch.where(few[..., None], all_mean, seen_mean)
    s, h = len(radius), len(rots)
    index = torch.tensor(index, device=dev)
    rot = torch.tensor(rots, dtype=torch.float64, device=dev)[None].expand(s, -1, -1, -1)
    scale = radius[:, None] / seen_rms[:, index].clamp(min=1e-9)  # (s, h)
    mean = seen_mean[:, index]  # (s, h, 3)
    translation = centre[:, None] - scale[..., None] * torch.einsum("shij,shj->shi", rot, mean)
    owner = torch.arange(s, device=dev).repeat_interleave(h)
    return _Poses(rot.reshape(-1, 3, 3), scale.reshape(-1), translation.reshape(-1, 3), owner)


def _umeyama(src, dst, weight):
    """`coarse._umeyama` in torch: batched weighted similarity dst ≈ c R src + b."""
    total = weight.sum(1).clamp(min=1e-12)[:, None]
    w = weight[..., None]
    mu_s = (w * src).sum(1) / total
    mu_d = (w * dst).sum(1) / total
    cs, cd = src - mu_s[:, None], dst - mu_d[:, None]
    cov = (w * cd).transpose(1, 2) @ cs / total[..., None]
    var = (w * cs * cs).sum((1, 2)) / total[:, 0]
    u, d, vt = torch.linalg.svd(cov)
    sign = torch.ones_like(d)
    sign[:, 2] = torch.sign(torch.linalg.det(u @ vt))
    rot = u @ (sign[..., None] * vt)
    c = (d * sign).sum(1) / var.clamp(min=1e-18)
    b = mu_d - c[:, None] * torch.einsum("hij,hj->hi", rot, mu_s)
    return rot, c, b


def _scaled_icp(
    views: _Views,
    cloud: torch.Tensor,
    valid: torch.Tensor,
    starts: _Poses,
    iterations: int,
    max_change: float,
):
    """`coarse.scaled_icp` for every hypothesis of every sample; `cloud` (s, n, 3) with `valid`
    (s, n) marks each sample's points. Returns the poses and (h,) trimmed mean distance."""
    o = starts.owner
    rot = starts.rotation.transpose(1, 2)
    c = 1.0 / starts.scale
    b = -c[:, None] * torch.einsum("hij,hj->hi", rot, starts.translation)
    c_lo, c_hi = c / max_change, c * max_change
    src, ok = cloud[o], valid[o]
    weight = ok.to(torch.float64)
    mean = (weight[..., None] * src).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)
    radius = views.radius[o]
    limit = radius
    for step in range(iterations):
        position = step * len(ICP_SCHEDULE) // max(iterations, 1)
        limit = ICP_SCHEDULE[min(position, len(ICP_SCHEDULE) - 1)] * radius
        x = c[:, None, None] * src @ rot.transpose(1, 2) + b[:, None]
        dst, inside = views.closest(o, x)
        matched = inside & ((dst - x).norm(dim=-1) < limit[:, None]) & ok
        rot, c, b = _umeyama(src, dst, matched.to(torch.float64))
        clipped = torch.minimum(torch.maximum(c, c_lo), c_hi)
        b = b + (c - clipped)[:, None] * torch.einsum("hij,hj->hi", rot, mean)
        c = clipped
    x = c[:, None, None] * src @ rot.transpose(1, 2) + b[:, None]
    dst, inside = views.closest(o, x)
    dist = torch.where(inside, torch.minimum((dst - x).norm(dim=-1), limit[:, None]), limit[:, None])
    error = (torch.where(ok, dist, 0.0).sum(1) / weight.sum(1).clamp(min=1)) / radius
    rotation = rot.transpose(1, 2)
    scale = 1.0 / c
    translation = -scale[:, None] * torch.einsum("hij,hj->hi", rotation, b)
    return _Poses(rotation, scale, translation, o), error


def _rank(views: _Views, poses: _Poses) -> torch.Tensor:
    """`coarse.rank_score` per hypothesis, rasterised on the grid lattice."""
    out = []
    for part in torch.arange(len(poses.scale), device=views.device).split(HYPOTHESES_PER_RASTER):
        sub = poses.take(part)
        o = sub.owner
        raster = rasterize(_screen(views, sub), _lattice_of(views.grid, o))
        rows, cols = views.grid.shape
        # Grid point g of a sample lies at lattice (g // columns, g % columns) of its own grid.
        at = _grid_lattice_index(views)[o]
        hit = torch.gather(raster.hit.reshape(len(o), -1), 1, at)
        depth = torch.gather(raster.depth.reshape(len(o), -1), 1, at).to(torch.float64)
        valid = views.grid_valid[o]
        mask = views.grid_mask[o]
        union = ((hit | mask) & valid).sum(1)
        iou = ((hit & mask) & valid).sum(1) / union.clamp(min=1)
        observed = (views.grid_depth[o] > 0) & valid
        tolerance = RANK_DEPTH_TOLERANCE * sub.scale * views.radius[o] + 3.0 * views.noise[o]
        residual = (depth - views.grid_depth[o]).abs()
        agreement = torch.where(hit, (1.0 - residual / tolerance[:, None]).clamp(0.0, 1.0), 0.0)
        mean = torch.where(observed, agreement, 0.0).sum(1) / observed.sum(1).clamp(min=1)
        out.append(torch.where(observed.any(1), iou * mean, 0.0))
    return torch.cat(out)


def _grid_lattice_index(views: _Views) -> torch.Tensor:
    """(s, g) flat index into the padded grid lattice of each sample's grid points (their order
    in `Observation.grid_uv` is row-major over the sample's own lattice)."""
    rows, cols = views.grid.shape
    g = torch.arange(views.grid_at.shape[1], device=views.device)[None]
    own = views.grid.columns[:, None]
    return torch.where(views.grid_valid, (g // own) * cols + g % own, 0)


def _subsample(clouds: list[np.ndarray], count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    picks = [c[np.linspace(0, len(c) - 1, min(len(c), count)).astype(int)] for c in clouds]
    valid = _pad([np.ones(len(p), bool) for p in picks], False)
    return torch.tensor(_pad(picks), dtype=torch.float64, device=device), torch.tensor(valid, device=device)


def _coarse(views: _Views, opts: PoseSettings) -> list[list[tuple[float, Similarity]]]:
    """`coarse.coarse_candidates` for every sample: (score, pose) of its `icp_keep` best."""
    clouds = [o.cloud for o in views.observations]
    sparse, sparse_ok = _subsample(clouds, 150, views.device)
    full, full_ok = _subsample(clouds, max(len(c) for c in clouds), views.device)
    starts = _initial_poses(views, full, full_ok, opts)
    poses, error = _scaled_icp(views, sparse, sparse_ok, starts, 12, 1.4)
    per = len(error) // len(clouds)
    keep = max(opts.icp_keep, per // 2)
    order = torch.argsort(error.reshape(len(clouds), per), dim=1, stable=True)[:, :keep]
    chosen = (order + torch.arange(len(clouds), device=views.device)[:, None] * per).reshape(-1)
    survivors = poses.take(chosen)
    dense, dense_ok = _subsample(clouds, 400, views.device)
    poses, _ = _scaled_icp(views, dense, dense_ok, survivors, 10, 1.25)
    scores = _rank(views, poses).cpu().numpy()
    owner = poses.owner.cpu().numpy()
    out = _split(list(zip(scores, poses.similarities(), strict=True)), owner, len(clouds))
    for candidates in out:
        candidates.sort(key=lambda item: -item[0])
    return [candidates[: opts.icp_keep] for candidates in out]


def _split(items: list, owner: np.ndarray, count: int) -> list[list]:
    out: list[list] = [[] for _ in range(count)]
    for item, o in zip(items, owner, strict=True):
        out[int(o)].append(item)
    return out


def point_mesh_distance(points: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """(n,) distance from each (n, 3) point to the nearest of the (f, 3, 3) triangles (closest
    point by Voronoi region, Ericson's "Real-Time Collision Detection" §5.1.5; NaN triangles are
    padding and ignored)."""
    out = []
    a, b, c = (tri[None, :, k] for k in range(3))
    for p in points.split(max(1, (1 << 22) // max(len(tri), 1))):
        p = p[:, None]
        ab, ac = b - a, c - a
        d1, d2 = _dot(ab, p - a), _dot(ac, p - a)
        d3, d4 = _dot(ab, p - b), _dot(ac, p - b)
        d5, d6 = _dot(ab, p - c), _dot(ac, p - c)
        va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
        total = va + vb + vc
        near = a + ab * (vb / total)[..., None] + ac * (vc / total)[..., None]  # inside the face
        # The regions in reverse order of precedence: each later `where` wins over the earlier.
        bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
        near = torch.where(
            bc[..., None], b + (c - b) * ((d4 - d3) / ((d4 - d3) + (d5 - d6)))[..., None], near
        )
        near = torch.where(
            ((vb <= 0) & (d2 >= 0) & (d6 <= 0))[..., None], a + ac * (d2 / (d2 - d6))[..., None], near
        )
        near = torch.where(((d6 >= 0) & (d5 <= d6))[..., None], c, near)
        near = torch.where(
            ((vc <= 0) & (d1 >= 0) & (d3 <= 0))[..., None], a + ab * (d1 / (d1 - d3))[..., None], near
        )
        near = torch.where(((d3 >= 0) & (d4 <= d3))[..., None], b, near)
        near = torch.where(((d1 <= 0) & (d2 <= 0))[..., None], a, near)
        dist = (p - near).norm(dim=-1)
        out.append(torch.nan_to_num(dist, nan=torch.inf).amin(dim=1))
    return torch.cat(out)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(-1)


class BatchedPoseEstimator:
    """`builtin` on a torch device, for many samples at once (`estimate_many`)."""

    name = "builtin"
    needs_rgb = False

    def __init__(self, options: PoseSettings, device: str = "cuda") -> None:
        self.options = options
        self.device = torch.device(device)

    def estimate(self, mesh, depth, mask, intrinsics, rgb=None) -> PoseResult:
        result = self.estimate_many([(mesh, depth, mask, intrinsics)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def estimate_many(
        self,
        views: list[tuple[trimesh.Trimesh, np.ndarray, np.ndarray, np.ndarray]],
        device: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> list[PoseResult | PoseNotFound]:
        """Pose of each (mesh, depth, mask, intrinsics) view, or the PoseNotFound it raised. The
        search on the device runs inside a `device()` turn (the stage's GPU slot); the views'
        observations and models are made on the host before it."""
        opts = self.options
        results: list[PoseResult | PoseNotFound | None] = [None] * len(views)
        models, observations, hints, slots = [], [], [], []
        for i, (mesh, depth, mask, k) in enumerate(views):
            try:
                obs = observe(
                    depth, mask, k, erosion_px=opts.erosion_px, grid_cells=opts.grid_cells,
                    band_px=opts.band_px, max_points=opts.cloud_points,
                )  # fmt: skip
                model = PoseModel(mesh)
            except (NoObservation, ValueError) as err:  # this sample's, not the batch's
                results[i] = PoseNotFound(str(err))
                continue
            models.append(model)
            observations.append(obs)
            hints.append(front_hints(mesh))
            slots.append(i)
        if not slots:
            return results  # type: ignore[return-value]
        with device(), torch.no_grad():
            found = self._search(_Views(models, observations, self.device), hints)
        for i, result in zip(slots, found, strict=True):
            results[i] = result
        return results  # type: ignore[return-value]

    def _search(self, views: _Views, hints: list[list[np.ndarray]]) -> list[PoseResult | PoseNotFound]:
        """The built-in search over the batch, step for step `BuiltinPoseEstimator.estimate`'s;
        `hints`: per sample, rotations to start from too."""
        opts = self.options
        starts = [
            distinct_poses(candidates, opts.refine_candidates, 25.0)
            + [hint_start(views.models[i], views.observations[i].cloud, rot) for rot in hints[i]]
            for i, candidates in enumerate(_coarse(views, opts))
        ]
        by_sample = self._refine_each(views, starts, opts.screen_iterations)
        for fits in by_sample:
            fits.sort(key=lambda f: -f[0])
        top = [fits[0][1] if fits else None for fits in by_sample]
        turns = [
            cube_turns(pose, model) if pose is not None else [] for pose, model in zip(top, views.models)
        ]
        finalists = [
            [f[1] for f in fits[: opts.finish_candidates]]
            + half_turns(pose)
            + best_of(turned, opts.cube_turn_candidates)
            if pose is not None
            else []
            for fits, pose, turned in zip(by_sample, top, self._refine_each(views, turns, 0), strict=True)
        ]
        finished = self._refine_each(views, finalists, opts.refine_iterations)
        sweeps = [sweep_starts(model, fits) if fits else [] for model, fits in zip(views.models, finished)]
        swept = self._refine_each(views, sweeps, opts.screen_iterations)
        polished = self._refine_each(
            views, [best_of(s, opts.sweep_candidates) for s in swept], opts.refine_iterations
        )
        finished = [fits + more for fits, more in zip(finished, polished, strict=True)]
        out: list[PoseResult | PoseNotFound] = []
        for i, (model, fits, screens) in enumerate(zip(views.models, finished, by_sample, strict=True)):
            if not screens:
                out.append(PoseNotFound("no pose hypothesis survived"))
                continue
            best_score, best = max(fits, key=lambda f: f[0])
            if best_score < opts.min_score:
                out.append(
                    PoseNotFound(f"best fit scores {best_score:.3f} < pose.min_score {opts.min_score}")
                )
                continue
            distance = self._surface_distance(views, i) if self.device.type == "cuda" else None
            rivals = [
                pose for _, pose in fits + screens if distinct_answers(model, best, pose, distance=distance)
            ]
            margin = self._margin(views, i, best, rivals)
            out.append(PoseResult(best.matrix(), float(best.scale), float(best_score), float(margin)))
        return out

    def _margin(self, views: _Views, sample: int, best: Similarity, rivals: list[Similarity]) -> float:
        """`refine.margin_against` with the device's casts: the best and its rivals cast at once."""
        if not rivals:
            return 1.0
        grid, band = _cast(views, _Poses.of([best, *rivals], [sample] * (len(rivals) + 1), self.device))
        m, b = int(views.grid_valid[sample].sum()), int(views.band_valid[sample].sum())
        g_hit, g_depth = grid.hit[:, :m].cpu().numpy(), grid.depth[:, :m].cpu().numpy()
        b_hit = band.hit[:, :b].cpu().numpy()
        obs_depth = views.grid_depth[sample, :m].cpu().numpy()
        band_obs = views.band_obs[sample, :b].cpu().numpy()
        tau = depth_tau(best.scale, float(views.radius[sample]), float(views.noise[sample]))
        step = int(round(float(views.grid.stride[sample])))
        mine = (g_hit[0], g_depth[0], b_hit[0])
        return min(
            answer_margin(step, tau, obs_depth, band_obs, mine, (g_hit[k], g_depth[k], b_hit[k]))
            for k in range(1, len(rivals) + 1)
        )

    def _surface_distance(self, views: _Views, sample: int) -> Callable[[np.ndarray], float]:
        """`PoseModel.surface_distance` on the device (on the CPU, Open3D's is the faster)."""
        model = views.models[sample]
        points = torch.tensor(model.surface_samples(SURFACE_CHECK), dtype=torch.float64, device=self.device)
        tri = views.tri[sample] - views.center[sample]

        def distance(turn: np.ndarray) -> float:
            turned = points @ torch.tensor(turn, dtype=torch.float64, device=self.device).T
            return float(point_mesh_distance(turned, tri).mean())

        return distance

    def _refine(self, views: _Views, starts: list[Similarity], owner: list[int], iterations: int):
        """(score, pose) of each start refined for `iterations`."""
        if not starts:
            return []
        opts = self.options
        fits = _refine(
            views,
            _Poses.of(starts, owner, self.device),
            iterations,
            opts.depth_sigma,
            opts.silhouette_sigma_px,
        )
        return list(zip(fits.score.cpu().numpy().tolist(), fits.poses.similarities(), strict=True))

    def _refine_each(self, views: _Views, starts: list[list[Similarity]], iterations: int) -> list[list]:
        """Per sample, (score, pose) of each of its `starts` refined for `iterations`, all
        samples' in one batch."""
        flat = [pose for group in starts for pose in group]
        owner = [i for i, group in enumerate(starts) for _ in group]
        return _split(self._refine(views, flat, owner, iterations), np.asarray(owner), len(starts))
