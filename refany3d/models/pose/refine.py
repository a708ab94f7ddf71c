"""Render-and-compare on the visible surface: robust Gauss-Newton over all 7 DoF (rotation, scale,
translation) of a similarity pose, from a coarse start.

Each iteration ray-casts the mesh at the current pose and linearises two residuals:
- depth, on a coarse pixel grid inside the eroded mask: point-to-plane distance between the
  rendered surface and the observed point at the same pixel (projective correspondences, so only
  the visible surface counts — hidden surfaces are what bias plain ICP's scale);
- silhouette, at full resolution on the rendered silhouette's boundary pixels near the mask
  boundary: the mask's signed distance at their projection (0 when the outlines coincide).
Both are down-weighted robustly (Huber) so bad mask pixels and flying depth at edges do not pull.
The update is applied about the object's centre in the camera frame:
    p' = exp(σ) Exp(ω) (p - t) + t + δ,   i.e. R' = Exp(ω) R, s' = exp(σ) s, t' = t + δ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refany3d.models.pose.model import PoseModel, Similarity
from refany3d.models.pose.observe import Observation, pixel_rays, sample_bilinear

MAX_ROTATION_STEP = np.radians(8.0)
MAX_SCALE_STEP = 0.08  # log scale
# A segmenter grows or shrinks the whole mask by a px or two, which the outline alone would read as
# scale: the fit estimates that offset too, held near 0 by a weak prior (σ px, weight relative to
# the whole silhouette term) so that it is decided by the shape and the depth, not by the mask.
OFFSET_SIGMA_PX = 1.5
OFFSET_PRIOR = 0.1
MAX_OFFSET_PX = 4.0
DAMPING = 1e-2  # Marquardt damping (fraction of the diagonal)


@dataclass(frozen=True)
class Fit:
    """A refined pose and how well it explains the view: silhouette IoU (band-accurate), depth
    agreement in [0, 1] (see `evaluate`), and `score` (their product)."""

    pose: Similarity
    iou: float
    depth_agreement: float
    offset: float = 0.0  # px the mask's outline lies outside the model's (a grown or shrunk mask)

    @property
    def score(self) -> float:
        return self.iou * self.depth_agreement


def _skew(v: np.ndarray) -> np.ndarray:
    """(n, 3, 3) cross-product matrices of (n, 3) vectors."""
    out = np.zeros(v.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2] = -v[..., 2], v[..., 1]
    out[..., 1, 0], out[..., 1, 2] = v[..., 2], -v[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -v[..., 1], v[..., 0]
    return out


def _exp_so3(w: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(w))
    if angle < 1e-12:
        return np.eye(3)
    k = _skew(w / angle)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _point_jacobian(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(n, 3, 7) derivative of camera points w.r.t. (ω, σ, δ) of the update above."""
    rel = points - centre
    jac = np.zeros((len(points), 3, 7))
    jac[:, :, 0:3] = -_skew(rel)
    jac[:, :, 3] = rel
    jac[:, :, 4:7] = np.eye(3)
    return jac


def _huber_weights(residual: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(residual)
    return np.where(a <= delta, 1.0, delta / np.maximum(a, 1e-12))


def _cauchy_weights(residual: np.ndarray, scale: float) -> np.ndarray:
    """IRLS weights of the Cauchy loss: an outlier's pull falls off as 1/r (a stretch of mask
    that bleeds onto the background), where Huber's stays constant."""
    return 1.0 / (1.0 + (residual / scale) ** 2)


class _Casts:
    """Rays of the observation's grid and band, cast once per pose."""

    def __init__(self, model: PoseModel, obs: Observation) -> None:
        self.model, self.obs = model, obs
        self.grid_rays = pixel_rays(obs.grid_uv, obs.intrinsics)
        self.band_rays = pixel_rays(obs.band_uv, obs.intrinsics)
        self.band_ij = obs.band_uv.astype(np.int64)
        self.band_obs = obs.mask[self.band_ij[:, 1], self.band_ij[:, 0]]
        self.band_sdf = obs.sdf[self.band_ij[:, 1], self.band_ij[:, 0]]
        self.grid_q = self.grid_rays * obs.grid_depth[:, None]

    def at(self, pose: Similarity):
        return self.model.cast(self.grid_rays, pose), self.model.cast(self.band_rays, pose)

    def contour(self, band_hit: np.ndarray) -> np.ndarray:
        """(b,) bool: band pixels inside the rendered silhouette with a 4-neighbour outside it.
        Pixels off the band take the observed mask's value (they are far from any edge)."""
        rendered = self.obs.mask.copy()
        u, v = self.band_ij[:, 0], self.band_ij[:, 1]
        rendered[v, u] = band_hit
        h, w = rendered.shape
        out = np.zeros(len(u), bool)
        for du, dv in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            out |= ~rendered[np.clip(v + dv, 0, h - 1), np.clip(u + du, 0, w - 1)]
        return out & band_hit


def evaluate(casts: _Casts, pose: Similarity, hits=None, depth_tol: float = 0.02, offset: float = 0.0) -> Fit:
    """IoU from the band (pixels off it agree by construction) with the mask's outline moved in
    by `offset` px, and the mean Gaussian agreement exp(-½ (r / τ)²) of the grid's observed depth
    with the rendered surface, τ combining `depth_tol` × object size and the view's depth noise
    (pixels the render misses count 0)."""
    grid, band = hits or casts.at(pose)
    obs = casts.obs
    shifted = casts.band_sdf < offset
    area = float(obs.mask.sum()) - np.count_nonzero(casts.band_obs) + np.count_nonzero(shifted)
    miss = np.count_nonzero(shifted & ~band.hit)
    extra = np.count_nonzero(~shifted & band.hit)
    iou = (area - miss) / (area + extra)
    observed = obs.grid_depth > 0
    tau = depth_tau(pose.scale, casts.model.radius, obs.depth_noise, depth_tol)
    residual = np.where(grid.hit, grid.depth - obs.grid_depth, np.inf)[observed]
    agreement = float(np.exp(-0.5 * (residual / tau) ** 2).mean()) if residual.size else 0.0
    return Fit(pose, float(iou), agreement, float(offset))


# `answer_margin`: an area of disagreement smaller than this (px) cannot decide between two answers
MARGIN_PRIOR_PX = 20.0


def depth_tau(scale: float, radius: float, noise: float, depth_tol: float = 0.02) -> float:
    """τ of the depth agreement (`evaluate`, `answer_margin`): `depth_tol` of the object's size
    (`scale` × mesh `radius`) combined with twice the view's per-pixel depth `noise`."""
    return float(np.hypot(depth_tol * scale * radius, 2.0 * noise))


def answer_margin(
    step: int,
    tau: float,
    grid_depth: np.ndarray,
    band_obs: np.ndarray,
    best: tuple[np.ndarray, np.ndarray, np.ndarray],
    rival: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> float:
    """How much better the `best` answer explains the view than `rival` where the two differ, in
    [-1, 1]: the mean agreement difference over the pixels their renders tell apart — grid pixels
    with observed depth (`grid_depth` (m,), 0 = none) where one hits and the other not or their
    depths differ by more than `tau`, each standing for step² px, and band pixels (observed mask
    `band_obs` (b,)) that one covers and the other not — shrunk towards 0 by `MARGIN_PRIOR_PX`.
    Per answer: (grid hit (m,), grid depth (m,), band hit (b,)). A knob or a handle decides between
    a box's faces or a cup's sides however small a part of the whole view it is; where the two
    answers look the same (a hidden handle), nothing decides and the margin is about 0.

    Agreement as `evaluate`: a grid pixel's is exp(-½ (r / τ)²) (0 where missed), a band pixel's
    1 where its render matches the mask."""
    observed = grid_depth > 0

    def agreement(grid_hit, depth, band_hit):
        g = np.where(grid_hit & observed, np.exp(-0.5 * ((depth - grid_depth) / tau) ** 2), 0.0)
        return g, (band_hit == band_obs).astype(np.float64)

    (ga, da, ba), (gb, db, bb) = best, rival
    grid_a, band_a = agreement(ga, da, ba)
    grid_b, band_b = agreement(gb, db, bb)
    differ = observed & ((ga != gb) | (np.abs(da - db) > tau))
    told = ba != bb
    area = step**2 * np.count_nonzero(differ) + np.count_nonzero(told)
    evidence = step**2 * (grid_a - grid_b)[differ].sum() + (band_a - band_b)[told].sum()
    return float(evidence / (area + MARGIN_PRIOR_PX))


def margin_against(model: PoseModel, obs: Observation, best: Similarity, rivals: list[Similarity]) -> float:
    """The least `answer_margin` of `best` over `rivals` (1.0 without any)."""
    if not rivals:
        return 1.0
    casts = _Casts(model, obs)
    tau = depth_tau(best.scale, model.radius, obs.depth_noise)

    def rendered(pose):
        grid, band = casts.at(pose)
        return grid.hit, grid.depth, band.hit

    mine = rendered(best)
    return min(
        answer_margin(obs.step, tau, obs.grid_depth, casts.band_obs, mine, rendered(r)) for r in rivals
    )


def score_pose(model: PoseModel, obs: Observation, pose: Similarity) -> Fit:
    """How well `pose` explains the view (the same measure `refine` ranks its iterates by)."""
    return evaluate(_Casts(model, obs), pose)


def _normal_equations(
    casts: _Casts,
    pose: Similarity,
    offset: float,
    hits,
    depth_sigma: float,
    sil_sigma: float,
    redescend: bool = False,
):
    """(8, 8) JᵀWJ and (8,) JᵀWr of both residuals and the offset's prior at `pose` and `offset`
    (each term normalised by its σ); parameters (ω, σ, δ, offset)."""
    grid, band = hits
    obs = casts.obs
    h_sum, g_sum = np.zeros((8, 8)), np.zeros(8)
    h_sum[7, 7] = OFFSET_PRIOR / OFFSET_SIGMA_PX**2
    g_sum[7] = OFFSET_PRIOR / OFFSET_SIGMA_PX**2 * offset
    size = pose.scale * casts.model.radius
    sel = grid.hit & (obs.grid_depth > 0)
    if sel.any():
        p = casts.grid_rays[sel] * grid.depth[sel, None]
        n = grid.normals[sel]
        r = np.einsum("ij,ij->i", n, p - casts.grid_q[sel]) / size
        jac = np.einsum("ij,ijk->ik", n, _point_jacobian(p, pose.translation)) / size
        w = _huber_weights(r, 1.5 * depth_sigma) / depth_sigma**2 / len(r)
        h_sum[:7, :7] += jac.T @ (jac * w[:, None])
        g_sum[:7] += jac.T @ (w * r)
    edge = casts.contour(band.hit)
    if edge.any():
        p = pose.apply(band.points[edge])
        k = obs.intrinsics
        uv = np.stack([k[0, 0] * p[:, 0] / p[:, 2] + k[0, 2], k[1, 1] * p[:, 1] / p[:, 2] + k[1, 2]], 1)
        r = sample_bilinear(obs.sdf, uv) - offset
        grad = np.stack([sample_bilinear(obs.sdf_grad[0], uv), sample_bilinear(obs.sdf_grad[1], uv)], 1)
        dproj = np.zeros((len(p), 2, 3))
        dproj[:, 0, 0] = k[0, 0] / p[:, 2]
        dproj[:, 0, 2] = -k[0, 0] * p[:, 0] / p[:, 2] ** 2
        dproj[:, 1, 1] = k[1, 1] / p[:, 2]
        dproj[:, 1, 2] = -k[1, 1] * p[:, 1] / p[:, 2] ** 2
        jac = np.einsum("ij,ijk,ikl->il", grad, dproj, _point_jacobian(p, pose.translation))
        jac = np.concatenate([jac, -np.ones((len(p), 1))], axis=1)
        w = _cauchy_weights(r, 1.5 * sil_sigma) if redescend else _huber_weights(r, 1.5 * sil_sigma)
        w = w / sil_sigma**2 / len(r)
        h_sum += jac.T @ (jac * w[:, None])
        g_sum += jac.T @ (w * r)
    return h_sum, g_sum


def _step(pose: Similarity, delta: np.ndarray, size: float) -> Similarity:
    w, sigma, shift = delta[0:3], delta[3], delta[4:7]
    angle = np.linalg.norm(w)
    if angle > MAX_ROTATION_STEP:
        w = w * MAX_ROTATION_STEP / angle
    sigma = float(np.clip(sigma, -MAX_SCALE_STEP, MAX_SCALE_STEP))
    norm = np.linalg.norm(shift)
    if norm > 0.2 * size:
        shift = shift * 0.2 * size / norm
    return Similarity(
        _exp_so3(w) @ pose.rotation, pose.scale * float(np.exp(sigma)), pose.translation + shift
    )


def _converged(delta: np.ndarray, size: float) -> bool:
    """True when a step moves the surface by less than 1e-4 of the object's size."""
    return float(np.abs(delta[:4]).max()) < 1e-4 and float(np.linalg.norm(delta[4:])) < 1e-4 * size


def refine(
    model: PoseModel,
    obs: Observation,
    start: Similarity,
    iterations: int,
    depth_sigma: float = 0.01,
    sil_sigma_px: float = 1.0,
) -> Fit:
    """Damped Gauss-Newton (IRLS: Huber weights re-computed every step) from `start`; returns
    the best-scoring iterate. Every step is taken — the score is flat far from the answer, so
    it ranks iterates but cannot gate steps; steps are clamped instead (`_step`). `depth_sigma`:
    depth residual scale as a fraction of the object's size; `sil_sigma_px`: silhouette scale in px."""
    casts = _Casts(model, obs)
    pose, offset = start, 0.0
    hits = casts.at(pose)
    best = evaluate(casts, pose, hits)
    for step in range(iterations):
        # Near the answer, outline pixels far off the mask are the mask's errors, not the pose's:
        # the second half lets their pull fade (from the start it would drop thin parts' outline).
        redescend = step >= iterations // 2 and iterations >= 8
        h_mat, g_vec = _normal_equations(casts, pose, offset, hits, depth_sigma, sil_sigma_px, redescend)
        damped = h_mat + DAMPING * np.diag(np.diag(h_mat) + 1e-9)
        try:
            delta = -np.linalg.solve(damped, g_vec)
        except np.linalg.LinAlgError:
            break
        size = pose.scale * model.radius
        pose = _step(pose, delta[:7], size)
        offset = float(np.clip(offset + delta[7], -MAX_OFFSET_PX, MAX_OFFSET_PX))
        hits = casts.at(pose)
        fit = evaluate(casts, pose, hits, offset=offset)
        if fit.score > best.score:
            best = fit
        if _converged(delta[:7], size):
            break
    return best
