"""What a stage gets besides its samples and settings: where artifacts live, and a logger."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from refany3d.storage.store import ArtifactStore


@dataclass
class StageContext:
    """Per-call context of a stage. `store` holds heavy artifacts; `seed` feeds any randomness;
    `key` is the stage's content key on this batch (`stages/keys.py`), for stages that name the
    files they write after what decides them. `device` is a turn on the GPU: a GPU stage holds
    one over each forward pass, and none over its host work (the flow gives it the machine's GPU
    slot; elsewhere it is nothing)."""

    store: ArtifactStore
    seed: int = 0
    key: str = ""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("refany3d"))
    device: Callable[[], AbstractContextManager] = contextlib.nullcontext
