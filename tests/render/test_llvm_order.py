import subprocess
import sys

SCRIPT = """
import numpy as np, trimesh
from refany3d.render.renderer import get_renderer
get_renderer()  # creates the GL context: Mesa loads its LLVM here
import triton  # a transformers model or inductor would do this later in the same process
print("alive")
"""


def test_render_then_triton_does_not_crash():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "alive" in proc.stdout, proc.stderr[-2000:]
