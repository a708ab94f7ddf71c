"""bench/unpack_wheels.py installs a wheel's files where `pip install --no-deps --target` does."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# pip's own bookkeeping, and what the unpacker leaves out on purpose (see its docstring)
_PIP_ONLY = {"INSTALLER", "RECORD", "REQUESTED", "direct_url.json"}


def _wheel(path: Path) -> Path:
    """A wheel with a package, a purelib file, a script and a header."""
    files = {
        "demo/__init__.py": b"VALUE = 1\n",
        "demo/native/lib.txt": b"data\n",
        "demo-1.0.data/purelib/demo_extra.py": b"EXTRA = 2\n",
        "demo-1.0.data/scripts/demo-tool": b"#!/bin/sh\necho tool\n",
        "demo-1.0.data/headers/demo.h": b"int demo;\n",
        "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "demo-1.0.dist-info/RECORD": b"",
    }
    wheel = path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if "scripts" in name else 0o644) << 16
            archive.writestr(info, data)
    return wheel


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file()
        and p.name not in _PIP_ONLY
        and "__pycache__" not in p.parts
        and p.parts[-2:-1] != ("bin",)
    }


def test_unpacked_files_equal_pips_target_install(tmp_path):
    wheel = _wheel(tmp_path)
    pip_target, ours = tmp_path / "pip", tmp_path / "ours"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--target", str(pip_target), str(wheel)],
        check=True,
    )  # fmt: skip
    subprocess.run([sys.executable, str(ROOT / "bench" / "unpack_wheels.py"), "--target", str(ours), str(wheel)],
                   check=True)  # fmt: skip
    pip_files = {
        k: v for k, v in _tree(pip_target).items() if not k.startswith("include")
    }  # headers: left out
    assert _tree(ours) == pip_files
    assert (ours / "demo_extra.py").read_bytes() == b"EXTRA = 2\n"  # purelib at the root, not under .data
    tool = ours / "bin" / "demo-tool"
    assert tool.read_bytes().endswith(b"echo tool\n") and os.access(tool, os.X_OK)
    assert not (ours / "demo-1.0.data").exists()
