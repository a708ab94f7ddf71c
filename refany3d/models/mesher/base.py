"""What a mesher backend does: one untextured mesh per object cut-out, in its canonical frame."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trimesh
from PIL import Image

from refany3d.config import MesherSettings
from refany3d.records import Sample


class MesherTimeout(RuntimeError):
    """The generation passed its deadline (`mesher.timeout_s` per object). `done` holds the
    meshes made before it, for the first `len(done)` objects: the stage keeps them and gives the
    rest a budget of their own."""

    def __init__(self, message: str, done: Sequence[trimesh.Trimesh | None] = ()) -> None:
        super().__init__(message)
        self.done = list(done)


class Mesher(Protocol):
    name: str

    def generate(
        self,
        images: Sequence[Image.Image],
        samples: Sequence[Sample],
        options: MesherSettings,
        seed: int,
        deadline: float,
    ) -> list[trimesh.Trimesh | None]:
        """One raw mesh per RGBA image (the object in alpha, nothing removed from it), `None` where
        no surface was found.

        Meshes are in the mesher's canonical frame: y up, the input view seen from +z (its front
        camera looks down -z), roughly inside [-1, 1]³, unknown metric scale. `deadline` is a
        `time.monotonic()` value; passing it raises MesherTimeout with the meshes already made. `samples` and `seed` feed the
        `truth` backend and the per-sample noise of generative ones.
        """
        ...
