"""Content keys of stage outputs: a hash of everything that decides what a stage writes.

The key of (stage, batch) chains the keys of the stage's inputs, so a change anywhere upstream —
a setting, a source file, the code of any stage before it — changes every key below it:

    key(stage, batch) = H(stage, the settings it reads, fingerprints of the weights it loads,
                          keys of its inputs, fingerprint of its code,
                          [source: its file's name, content fingerprint and the batch's row range])

Keys say nothing about where a build writes or reads (the build id, the data file's URL and
whether outputs exist are the flow's business), so the same inputs give the same key, and the
same shard names, in any directory. Weights are content too: a weights setting enters the key as
a fingerprint of the files it names (`weights_fingerprint`), not as its path.

The code fingerprint of a stage hashes the modules of this package that its module imports,
transitively, as syntax trees without docstrings (`refany3d/code_fingerprints.py`): a changed
comment or docstring in `render/` re-runs nothing, a changed line of code re-runs exactly the
stages that import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from refany3d.code_fingerprints import PACKAGE, code_digest, module_closure, module_fingerprint
from refany3d.config import BuildSettings
from refany3d.stages.dag import DEVICE_FIELDS, STAGES, build_stages, plan_inputs, shard_columns
from refany3d.storage.fs import url_to_fs

__all__ = [
    "batch_keys",
    "code_digest",
    "code_fingerprint",
    "key_refs",
    "module_closure",
    "module_fingerprint",
    "weights_fingerprint",
    "weights_fingerprints",
]


def code_fingerprint(stage: str) -> str:
    """Hash of the code that decides `stage`'s output (its module and what it imports)."""
    # "missing" for a stage not built yet; the flow refuses to run it before keys matter
    return module_fingerprint(f"{PACKAGE}.stages.{STAGES[stage].module}")


# Settings that do not decide what a stage keeps: a sample over its time budget is a transient
# drop, never cached (`flows/tasks.py`), so the budget decides no cached output.
_NOT_IN_KEYS = frozenset({"mesher.timeout_s", "mesher.post_processes"})


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _get(settings: Any, ref: str) -> Any:
    for part in ref.split("."):
        settings = getattr(settings, part)
    return settings


def _section_hash(section: Any, ref: str, weights: Mapping[str, str]) -> str:
    """`settings_hash` of a section, its weights fields replaced by their files' fingerprints and
    the fields of `_NOT_IN_KEYS` left out."""
    values = dataclasses.asdict(section)
    for name in list(values):
        dotted = f"{ref}.{name}"
        if dotted in _NOT_IN_KEYS:
            del values[name]
        elif dotted in weights:
            values[name] = weights[dotted]
    return _hash(values)[:16]


def settings_part(
    settings: BuildSettings, refs: tuple[str, ...], weights: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Hashes of the settings sections or dotted fields `refs` of `settings`; a weights field
    (a key of `weights`) hashes as its fingerprint there."""
    weights = weights or {}
    out = {}
    for ref in refs:
        value = _get(settings, ref)
        if dataclasses.is_dataclass(value):
            out[ref] = _section_hash(value, ref, weights)
        else:
            out[ref] = _hash(weights.get(ref, value))
    return out


_HEAD = 1 << 20  # bytes hashed at each end of a weights file


def _file_digest(path: Path) -> list[Any]:
    """(size, hash of the first and last MiB, safetensors header) of one weights file: cheap on
    multi-GB checkpoints, and it sees a retrained file of the same shapes (the data at both ends
    changes; the end of a torch zip checkpoint is its directory, with a CRC of every tensor)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    header = b""
    with path.open("rb") as fh:
        digest.update(fh.read(_HEAD))
        if size > 2 * _HEAD:
            fh.seek(size - _HEAD)
        digest.update(fh.read())
        if path.suffix == ".safetensors" and size >= 8:
            fh.seek(0)
            length = int.from_bytes(fh.read(8), "little")
            header = fh.read(min(length, size - 8))
    return [size, digest.hexdigest(), hashlib.sha256(header).hexdigest() if header else ""]


def _files(root: Path) -> list[Path]:
    """Files under a weights directory, hidden ones (`.cache/huggingface` bookkeeping) left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def weights_fingerprint(value: str) -> str:
    """Fingerprint of the weights a setting names: a file (its size and bytes at both ends, and a
    safetensors header), a directory (every file's relative name and digest), or a hub id held in
    the local Hugging Face cache (its snapshot directory). Where the files live does not enter it.
    Empty stays empty; a name that resolves to nothing is `unresolved:<name>` (preflight rejects
    the build before keys matter)."""
    if not value:
        return ""
    path = Path(value).expanduser()
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(value, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, not a hub id, offline: all unresolved
            return f"unresolved:{value}"
    if path.is_file():
        return _hash(["file", _file_digest(path)])
    return _hash(["dir", [(f.relative_to(path).as_posix(), _file_digest(f)) for f in _files(path)]])


def weights_fingerprints(settings: BuildSettings, stages: list[str] | None = None) -> dict[str, str]:
    """`weights_fingerprint` of every weights field of `stages` (default: the build's), by dotted
    name. The LPIPS file's field, empty by default, names the file `load_lpips` reads then."""
    from refany3d.models.weights import lpips_weights_path  # config only

    out = {}
    for stage in stages if stages is not None else build_stages(settings.until):
        for ref in STAGES[stage].weights:
            value = _get(settings, ref)
            if ref == "verify.lpips_weights":
                value = str(lpips_weights_path(settings.verify))
            out[ref] = weights_fingerprint(value)
    return out


def file_fingerprint(url: str) -> str:
    """Hash of a Parquet file's size and footer (schema, row groups, their byte ranges and
    statistics): rewritten rows change it, and it costs one footer read, not the whole file."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        footer = pq.ParquetFile(fh).metadata.to_dict()
    return _hash([fs.size(path), footer])


def key_refs(settings: BuildSettings, stage: str) -> tuple[str, ...]:
    """The settings sections and fields whose values enter `stage`'s key in a build of `settings`:
    the stage's own (`StageSpec.sections`), and the device where it runs a network there."""
    spec = STAGES[stage]
    return spec.sections + (DEVICE_FIELDS if spec.on_device(settings) else ())


def batch_keys(
    settings: BuildSettings, batch_ident: str, file_hash: str, weights: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The content key of every stage a build of `settings` runs on one source batch.

    `batch_ident` names the batch by content, never by location (`SourceBatch.content_ref`: the
    file's name, which sample ids carry, and the row range), `file_hash` is `file_fingerprint` of
    its file, `weights` is `weights_fingerprints(settings)` (computed here when not given)."""
    if weights is None:
        weights = weights_fingerprints(settings)
    keys: dict[str, str] = {}
    for stage in build_stages(settings.until):
        parts: dict[str, Any] = {
            "stage": stage,
            "settings": settings_part(settings, key_refs(settings, stage), weights),
            "inputs": [keys[p] for p in plan_inputs(stage, settings.until)] if stage != "source" else [],
            "code": code_fingerprint(stage),
        }
        if stage == "source":
            parts["batch"] = [batch_ident, file_hash]
        if stage == "shard":
            parts["columns"] = shard_columns(settings.until)
        keys[stage] = f"{stage}-{_hash(parts)[:32]}"
    return keys
