"""Tiny random-weight RefAny3D models and batches for the flux tests (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from refany3d.config import ModelSettings
from refany3d.models.flux import FlowBatch, build_model

TEXT, TARGET_HW, COND_HW, VIEWS, BATCH = 5, (2, 3), (2, 2), 3, 2


def make_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = ModelSettings(**{"attention": "grouped", "gradient_checkpointing": False, **overrides})
    return build_model(settings)


def make_batch(seed: int = 1, views: int = VIEWS, point_map: bool = True) -> FlowBatch:
    g = torch.Generator().manual_seed(seed)
    lt, lc = TARGET_HW[0] * TARGET_HW[1], COND_HW[0] * COND_HW[1]

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return FlowBatch(
        target_rgb=randn(BATCH, lt, 64),
        text=randn(BATCH, TEXT, 32),
        pooled=randn(BATCH, 32),
        target_size=TARGET_HW,
        target_point_map=randn(BATCH, lt, 64) if point_map else None,
        cond_rgb=randn(BATCH, views, lc, 64) if views else None,
        cond_point_map=randn(BATCH, views, lc, 64) if views and point_map else None,
        cond_size=COND_HW if views else None,
    )


def forward(model, batch: FlowBatch, timestep: float = 0.4):
    t = torch.full((batch.target_rgb.shape[0],), timestep)
    return model(
        target_rgb=batch.target_rgb,
        target_point_map=batch.target_point_map,
        encoder_hidden_states=batch.text,
        pooled_projections=batch.pooled,
        timestep=t,
        target_size=batch.target_size,
        cond_rgb=batch.cond_rgb,
        cond_point_map=batch.cond_point_map,
        cond_size=batch.cond_size,
        guidance=torch.ones_like(t),
    )


@pytest.fixture
def batch() -> FlowBatch:
    return make_batch()
