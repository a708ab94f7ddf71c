"""Shared fixtures of the training tests: rendered shards (once per session) and tiny settings."""

from __future__ import annotations

import pytest
import torch

from refany3d.config import TrainSettings, load_settings
from tests.train._shards import rendered_rows, write_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are far too small for intra-op threads (20x slower on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rows():
    """4 rendered samples at 32 px with 2 orbit views."""
    return rendered_rows(4)


@pytest.fixture(scope="session")
def dataset(rows, tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dataset"), rows)


def tiny_settings(data, out, **dotted) -> TrainSettings:
    """Settings of a CPU run of the tiny model on the 32 px test shards."""
    base = {
        "data.shards": str(data),
        "data.resolution": "32",
        "data.condition_resolution": "32",
        "model.num_views": "2",
        "model.attention": "grouped",
        "model.gradient_checkpointing": "false",
        "checkpoint.dir": str(out),
        "data.cache": str(out) + "-cache",
        "checkpoint.sample_steps": "2",
        "checkpoint.sample_every": "1000",
        "checkpoint.every": "1000",
        "optim.steps": "4",
    }
    base.update({k: str(v) for k, v in dotted.items()})
    return load_settings(TrainSettings, None, base, environ={})
