"""Experiment tracking through accelerate's trackers (`checkpoint.report_to`), and metrics.jsonl.

`report_to=tensorboard`: the main process writes TensorBoard event files under
`checkpoint.logging_dir` (empty: `DIR/tensorboard`) in a directory named after the run
(`name`): each step the scalars `train/<name>` of `SCALARS` (loss terms, learning rate, gradient
norm, samples/s, seconds per step), at each preview step the preview strip as the image
`preview`, and the settings as hyperparameters. A resumed run purges the events its killed
predecessor logged after the checkpoint (SummaryWriter's `purge_step`), so each step shows once.

metrics.jsonl holds one JSON row per step. It is appended (`MetricsLog`, every `log_every` steps,
before each checkpoint and at the end), never rewritten whole on a file system (an object store has
no append: there the object is written again, old rows and new); a resumed run cuts it back once to
its checkpoint's step.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from refany3d.config import SettingsError, TrainSettings, to_dict
from refany3d.storage.fs import atomic_rename, url_to_fs
from refany3d.storage.store import join, write_atomic

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
# per-step values of a metrics row that go to the tracker as `train/<name>`
SCALARS = ("loss", "loss_rgb", "loss_point_map", "lr", "grad_norm", "samples_per_s", "step_s")


def logging_dir(settings: TrainSettings) -> str:
    """The local directory the tracker writes under; SettingsError for a remote `checkpoint.dir`
    without `checkpoint.logging_dir` (TensorBoard's writer writes local files only)."""
    cfg = settings.checkpoint
    if cfg.logging_dir:
        return cfg.logging_dir
    fs, root = url_to_fs(cfg.dir)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise SettingsError(
            f"checkpoint.logging_dir: checkpoint.dir {cfg.dir!r} is not local, and TensorBoard writes "
            "local files; set checkpoint.logging_dir to a local directory"
        )
    return join(root, TENSORBOARD)


def accelerator_kwargs(settings: TrainSettings) -> dict[str, Any]:
    """`Accelerator(...)` arguments of `checkpoint.report_to` ({} for none)."""
    if settings.checkpoint.report_to == "none":
        return {}
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    if not is_tensorboard_available():
        raise SettingsError(
            "checkpoint.report_to: 'tensorboard', but the tensorboard package is not installed "
            "(pip install tensorboard); or set checkpoint.report_to=none"
        )

    directory = logging_dir(settings)
    return {
        "log_with": settings.checkpoint.report_to,
        "project_config": ProjectConfiguration(project_dir=directory, logging_dir=directory),
    }


def hyperparameters(settings: TrainSettings) -> dict[str, Any]:
    """The settings as flat `section.field` scalars (what TensorBoard's hparams take)."""
    out: dict[str, Any] = {}

    def flat(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                flat(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)

    flat(to_dict(settings), "")
    return out


def start_tracking(accelerator: Any, settings: TrainSettings, resumed_step: int | None) -> None:
    """Start the trackers of `checkpoint.report_to` (no-op for none)."""
    if settings.checkpoint.report_to == "none":
        return
    init = {"tensorboard": {"purge_step": resumed_step + 1}} if resumed_step is not None else {}
    accelerator.init_trackers(settings.name, config=hyperparameters(settings), init_kwargs=init)


def log_step(accelerator: Any, settings: TrainSettings, row: dict[str, float]) -> None:
    if settings.checkpoint.report_to != "none":
        values = {f"train/{k}": float(row[k]) for k in SCALARS if k in row}
        accelerator.log(values, step=int(row["step"]))


def log_preview(accelerator: Any, settings: TrainSettings, png: bytes, step: int) -> None:
    """The preview strip (a PNG) as the tracker's image `preview` at `step`."""
    if settings.checkpoint.report_to == "none" or not accelerator.is_main_process:
        return
    from PIL import Image

    strip = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    accelerator.get_tracker(settings.checkpoint.report_to).log_images(
        {"preview": strip[None]}, step=step, dataformats="NHWC"
    )


def end_tracking(accelerator: Any, settings: TrainSettings) -> None:
    if settings.checkpoint.report_to != "none":
        accelerator.end_training()


class MetricsLog:
    """metrics.jsonl of a run: rows are appended as they come (`add`), written out by `flush`."""

    def __init__(self, out: str):
        self.out = out
        self.pending: list[dict[str, float]] = []

    def restart(self, rows: list[dict[str, float]]) -> None:
        """Make the file hold exactly `rows` (a resumed run's history up to its checkpoint)."""
        fs, root = url_to_fs(self.out)
        write_atomic(fs, join(root, METRICS), "".join(json.dumps(r) + "\n" for r in rows).encode())
        self.pending = []

    def add(self, row: dict[str, float]) -> None:
        self.pending.append(row)

    def flush(self) -> None:
        if not self.pending:
            return
        fs, root = url_to_fs(self.out)
        path = join(root, METRICS)
        fs.makedirs(root, exist_ok=True)
        data = "".join(json.dumps(r) + "\n" for r in self.pending).encode()
        if atomic_rename(fs):  # a file system: append
            with fs.open(path, "ab") as f:
                f.write(data)
        else:  # an object store has no append: the object again, old rows + new, in one PUT
            old = fs.cat_file(path) if fs.exists(path) else b""
            write_atomic(fs, path, old + data)
        self.pending = []
