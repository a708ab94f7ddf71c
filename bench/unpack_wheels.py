"""Unpack wheels into a `--target` directory, many at once: what `pip install --no-deps --target`
does with them, in seconds instead of minutes on the GPU machine (whose device time the install
spends: 60-130 s for the 90 whole-DAG wheels with pip, one at a time).

Each wheel is a zip: its files go to the target as they are, but `<name>.data/purelib` and
`platlib` go to the target's root and `<name>.data/scripts` to `bin/` (the wheel spec's install
scheme for a target directory). What pip adds and the bench never needs is left out: console
entry-point scripts (the bench runs `python -m prefect`), INSTALLER and RECORD bookkeeping.

    python3 bench/unpack_wheels.py --target /tmp/site /tmp/.whl/*.whl
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_ROOT_SCHEMES = ("purelib", "platlib")


def _destination(name: str, target: Path) -> Path | None:
    """Where a wheel member goes under `target` (None: not installed)."""
    top, _, rest = name.partition("/")
    if not top.endswith(".data") or not rest:
        return target / name
    scheme, _, inner = rest.partition("/")
    if not inner:
        return None
    if scheme in _ROOT_SCHEMES:
        return target / inner
    if scheme == "scripts":
        return target / "bin" / inner
    return None  # headers and data: nothing in the bench reads them


def unpack(wheel: str, target: str) -> int:
    """Unpack one wheel; the number of files written."""
    root, written = Path(target), 0
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            dest = _destination(info.filename, root)
            if dest is None:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("wheels", nargs="+")
    args = p.parse_args(argv)
    Path(args.target).mkdir(parents=True, exist_ok=True)
    # The largest first: the pool finishes when the slowest wheel does.
    wheels = sorted(args.wheels, key=lambda w: -os.path.getsize(w))
    with ProcessPoolExecutor(args.processes) as pool:
        files = sum(pool.map(unpack, wheels, [args.target] * len(wheels)))
    print(f"unpacked {len(wheels)} wheels, {files} files, into {args.target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
