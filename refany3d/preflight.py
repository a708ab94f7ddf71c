"""Run-level checks of a build, made before any work: each failure is one SettingsError whose
message names the setting or file at fault (the CLI prints it as one line and exits 2).

`preflight(settings)` checks, cheapest first, that `until` and every stage up to it exist, that each
backend finds its weights, that every data file is Subjects200K-format Parquet (its footer read,
no data pages), and that `storage.out` (and `storage.artifacts`) can be written. No Prefect
import: the CLI calls it before starting Prefect, and the flow calls it again for runs that do not
come through the CLI (deployments).
"""

from __future__ import annotations

import os
import uuid

from refany3d.config import BuildSettings, SettingsError
from refany3d.records import Rejection
from refany3d.storage.fs import atomic_rename, url_to_fs
from refany3d.storage.store import join


def preflight(settings: BuildSettings) -> list[Rejection]:
    """Check that the build of `settings` can run; returns the file-level `bad_file` rejects of
    the data files skipped under `source.skip_bad_files` (empty otherwise).

    Raises SettingsError (or FileNotFoundError when no data file matches) naming the cause.
    """
    from refany3d.models.weights import check_weights
    from refany3d.stages.dag import ancestors, check_until, stage_function
    from refany3d.stages.read_source import check_source

    check_until(settings)
    stages = ancestors(settings.until)
    for stage in stages:
        stage_function(stage)
    check_weights(settings, stages)
    rejects = check_source(settings)
    # Last: it creates the output directory, which a build that fails above must not leave behind.
    check_writable(settings.storage.out, "storage.out")
    if settings.storage.artifacts:
        check_writable(settings.storage.artifacts, "storage.artifacts")
    return rejects


def check_writable(url: str, setting: str) -> None:
    """Create the directory `url` (any fsspec URL) if needed and write and remove a probe file in
    it; SettingsError naming `setting` when that fails (read-only, a file in the way, no access)."""
    try:
        fs, path = url_to_fs(url)
        if atomic_rename(fs):  # local: create it; an object store has no directories, and the
            fs.makedirs(path, exist_ok=True)  # bucket must exist (a build never creates one)
        probe = join(path, f".refany3d-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with fs.open(probe, "wb") as fh:
            fh.write(b"")
        fs.rm(probe)
    except Exception as err:  # noqa: BLE001 - any failure here means the same: the build cannot write there
        cause = getattr(err, "strerror", None) or " ".join(str(err).split()) or type(err).__name__
        raise SettingsError(
            f"{setting}={url!r}: cannot write there ({type(err).__name__}: {cause})"
        ) from None
