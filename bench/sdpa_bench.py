"""SDPA kernels on the attention shapes our networks run: milliseconds, TFLOP/s and error of flash,
cuDNN and memory-efficient attention, the fastest one within tolerance per shape, written as the
table `refany3d.models.sdpa` chooses kernels from (issue #23.3).

Each shape is (batch, heads, queries, keys, head dim, dtype, pass), taken from the full-size
configs (`refany3d.testing.hunyuan3d.full_config`, the published GroundingDINO-T / Depth Pro /
FLUX.1-dev configs) at the build's and training's defaults. Every kernel runs alone
(`sdpa_kernel([kernel])`: a refusal is recorded, not hidden by a fallback), timed with CUDA events
(median of `--reps`); its output is compared on the first 4,096 queries with fp32 math attention
(max |kernel - reference| / max |reference|). `best` = the fastest kernel whose error is within
`refany3d.models.sdpa.TOLERANCE`.

    python bench/sdpa_bench.py --json bench/results/sdpa_h200.json --table refany3d/models/sdpa_table.json
    python bench/sdpa_bench.py --report bench/results/sdpa_h200.json --md bench/results/sdpa.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refany3d.models.sdpa import TOLERANCE, sdpa_order  # noqa: E402

# site: (batch, heads, queries, keys, head dim, dtype, backward)
SHAPES = {
    "hunyuan3d.dit standard (DiT batch 4 x CFG; 3,072 latents + 1,370 image tokens)": (8, 16, 4442, 4442, 64, "float16", False),
    "hunyuan3d.dit turbo (DiT batch 4, guidance-distilled)": (4, 16, 4442, 4442, 64, "float16", False),
    "hunyuan3d.conditioner (DINOv2-giant, 518 px, batch 4)": (4, 24, 1370, 1370, 64, "float16", False),
    "hunyuan3d.vae (self-attention over the latents)": (1, 16, 3072, 3072, 64, "float16", False),
    "hunyuan3d.decoder (dense chunk of 200,000 queries on the latents)": (1, 16, 200000, 3072, 64, "float16", False),
    "hunyuan3d.decoder flashvdm (a refined chunk on selected latents)": (1, 16, 20000, 1024, 64, "float16", False),
    "depth_pro.patches (35 patches of 384 px per image, batch 8)": (280, 16, 577, 577, 64, "float16", False),
    "depth_pro.image (the 384 px image encoder, batch 8)": (8, 16, 577, 577, 64, "float16", False),
    "grounding_dino.text (BERT-base, 32 prompt tokens, batch 8)": (8, 12, 32, 32, 64, "float16", False),
    "flux.sample (FLUX.1-dev, 18,944 tokens: the group attention's largest call)": (1, 24, 18944, 18944, 128, "bfloat16", False),
    "flux.train (the same, forward + backward)": (1, 24, 18944, 18944, 128, "bfloat16", True),
}  # fmt: skip
KERNELS = ("flash", "cudnn", "efficient")
REFERENCE_QUERIES = 4096


def _flops(b, h, q, k, d, backward) -> float:
    return 4.0 * b * h * q * k * d * (3.5 if backward else 1.0)


def measure(shape: tuple, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    b, h, q, k, d, dtype, backward = shape
    gen = torch.Generator("cuda").manual_seed(0)
    dt = getattr(torch, dtype)
    query = torch.randn(b, h, q, d, device="cuda", dtype=dt, generator=gen, requires_grad=backward)
    key = torch.randn(b, h, k, d, device="cuda", dtype=dt, generator=gen, requires_grad=backward)
    value = torch.randn(b, h, k, d, device="cuda", dtype=dt, generator=gen, requires_grad=backward)
    n = min(q, REFERENCE_QUERIES)
    with torch.no_grad(), sdpa_order(("math",)):
        reference = F.scaled_dot_product_attention(query[:, :, :n].float(), key.float(), value.float())
    scale = reference.abs().max().item()
    out = {"ms": {}, "tflops": {}, "error": {}, "refused": {}}
    for kernel in KERNELS:
        with sdpa_order((kernel,)):

            def call():
                o = F.scaled_dot_product_attention(query, key, value)
                if backward:
                    o.backward(torch.ones_like(o))
                return o

            try:
                result = call()
            except RuntimeError as err:  # this kernel does not take the shape
                out["refused"][kernel] = str(err).splitlines()[0][:200]
                continue
            out["error"][kernel] = (result[:, :, :n].float() - reference).abs().max().item() / scale
            for _ in range(2):
                call()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            ms = sorted(times)[len(times) // 2]
            out["ms"][kernel] = ms
            out["tflops"][kernel] = _flops(b, h, q, k, d, backward) / ms / 1e9
        query.grad = key.grad = value.grad = None
    within = [c for c in out["ms"] if out["error"][c] <= TOLERANCE[dtype]]
    out["best"] = min(within, key=out["ms"].get) if within else None
    return out


# FlashVDM's refinement: one SDPA call per grid cell, its query count new almost every call
RAGGED = {"site": "hunyuan3d.decoder flashvdm, ragged", "heads": 16, "keys": 1024, "head_dim": 64,
          "dtype": "float16", "queries": (500, 20000)}  # fmt: skip


def ragged(calls: int) -> dict:
    """Host milliseconds per SDPA call (until the call returns, the GPU not waited for) on
    `calls` ragged FlashVDM shapes, per kernel and in PyTorch's own order: first on shapes the
    process has not seen, then on the same shapes again. A kernel that plans per shape shows it
    as host time on the first pass only; the table's fixed-shape timing cannot."""
    import random
    import time

    import torch
    import torch.nn.functional as F

    lengths = random.Random(0).sample(range(*RAGGED["queries"]), calls)
    h, k, d = RAGGED["heads"], RAGGED["keys"], RAGGED["head_dim"]
    dt = getattr(torch, RAGGED["dtype"])
    key, value = (torch.randn(1, h, k, d, device="cuda", dtype=dt) for _ in range(2))
    queries = torch.randn(1, h, max(lengths), d, device="cuda", dtype=dt)
    out: dict = {**RAGGED, "queries": list(RAGGED["queries"]), "calls": calls, "host_ms": {}, "refused": {}}
    for kernel in ("default", *KERNELS):
        order = contextlib.nullcontext() if kernel == "default" else sdpa_order((kernel,))
        passes = []
        with order:
            try:
                for _ in range(2):
                    host = []
                    for n in lengths:
                        t = time.perf_counter()
                        F.scaled_dot_product_attention(queries[:, :, :n], key, value)
                        host.append(time.perf_counter() - t)
                        torch.cuda.synchronize()
                    passes.append(1e3 * sum(host) / len(host))
            except RuntimeError as err:
                out["refused"][kernel] = str(err).splitlines()[0][:200]
                continue
        out["host_ms"][kernel] = {"new_shapes": round(passes[0], 4), "seen_shapes": round(passes[1], 4)}
        print(json.dumps({"ragged": kernel, **out["host_ms"][kernel]}), flush=True)
    return out


def ragged_cells(calls: int) -> dict:
    """Host milliseconds per step of FlashVDM's per-cell refinement (hy3dgen's
    `FlashVDMCrossAttentionProcessor`: slice the cell's queries, score the keys, top-k, gather,
    SDPA) in PyTorch's own kernel order, on `calls` new cell sizes: which step a launching thread
    spends its time in when the GPU idles."""
    import random
    import time

    import torch
    import torch.nn.functional as F

    lengths = random.Random(1).sample(range(*RAGGED["queries"]), calls)
    h, d, latents, topk = RAGGED["heads"], RAGGED["head_dim"], 3072, RAGGED["keys"]
    dt = getattr(torch, RAGGED["dtype"])
    key, value = (torch.randn(1, h, latents, d, device="cuda", dtype=dt) for _ in range(2))
    queries = torch.randn(1, h, max(lengths), d, device="cuda", dtype=dt)
    steps = ("slice", "score", "topk", "gather", "sdpa")
    host = dict.fromkeys(steps, 0.0)
    for n in lengths:
        t = [time.perf_counter()]
        q = queries[:, :, :n]
        t.append(time.perf_counter())
        sim = (q[:, :, ::50] @ key.transpose(-1, -2)).mean(-2)
        t.append(time.perf_counter())
        index = torch.topk(sim, dim=-1, k=topk).indices.squeeze(-2).unsqueeze(-1).expand(-1, -1, -1, d)
        t.append(time.perf_counter())
        k0, v0 = torch.gather(key, -2, index), torch.gather(value, -2, index)
        t.append(time.perf_counter())
        F.scaled_dot_product_attention(q, k0, v0)
        t.append(time.perf_counter())
        for step, a, b in zip(steps, t, t[1:]):
            host[step] += b - a
        torch.cuda.synchronize()
    return {"calls": calls, "host_ms_per_cell": {k: round(1e3 * v / calls, 4) for k, v in host.items()}}


def run(args) -> dict:
    import torch

    name = torch.cuda.get_device_name()
    capability = list(torch.cuda.get_device_capability())
    # PyTorch settles its own kernel order on the process's first SDPA call (cuDNN first on
    # Hopper / Blackwell with a recent cuDNN): make that call outside any priority context
    x = torch.zeros(1, 1, 8, 64, device="cuda", dtype=torch.float16)
    torch.nn.functional.scaled_dot_product_attention(x, x, x)
    priority = [int(p) for p in torch._C._get_sdp_priority_order()]
    rows = []
    for site, shape in SHAPES.items():
        b, h, q, k, d, dtype, backward = shape
        row = {"site": site, "device": name, "capability": capability, "batch": b, "heads": h,
               "queries": q, "keys": k, "head_dim": d, "dtype": dtype, "backward": backward,
               **measure(shape, args.reps)}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("site", "ms", "error", "refused", "best")}), flush=True)
        torch.cuda.empty_cache()
    return {
        "bench": "sdpa_bench",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "device": name,
            "capability": capability,
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(),
            "priority": priority,  # PyTorch's own order after its first call (SDPBackend values)
        },  # fmt: skip
        "tolerance": TOLERANCE,
        "rows": rows,
        "ragged": ragged(args.ragged_calls) if args.ragged_calls else None,
        "ragged_cells": ragged_cells(args.ragged_calls) if args.ragged_calls else None,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# SDPA kernels per attention shape ({m['device']}, {report['date']})",
        "",
        f"torch {m['torch']}, cuDNN {m['cudnn']}; `python bench/sdpa_bench.py` (median of the "
        "timed calls; error = max |kernel - fp32 math| / max |fp32 math| on the first 4,096 queries; "
        f"chosen = the fastest within {report['tolerance']}). `refany3d/models/sdpa_table.json` is "
        "this table; `refany3d.models.sdpa.attention_kernels` runs the chosen kernel first.",
        "",
        "| site | B x H x Q x K x D, dtype | flash ms (TFLOP/s) | cuDNN ms (TFLOP/s) | efficient ms | "
        "error flash / cuDNN | chosen |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(r, k):
        if k in r["refused"]:
            return "refused"
        return f"{r['ms'][k]:.3f} ({r['tflops'][k]:.0f})" if k in r["ms"] else "-"

    for r in report["rows"]:
        err = " / ".join(f"{r['error'][k]:.1e}" if k in r["error"] else "-" for k in ("flash", "cudnn"))
        shape = f"{r['batch']}x{r['heads']}x{r['queries']}x{r['keys']}x{r['head_dim']}, {r['dtype']}"
        shape += " fwd+bwd" if r["backward"] else ""
        lines.append(
            f"| {r['site']} | {shape} | {cell(r, 'flash')} | {cell(r, 'cudnn')} | "
            f"{r['ms'].get('efficient', float('nan')):.3f} | {err} | **{r['best']}** |"
        )
    if report.get("ragged"):
        r = report["ragged"]
        lines += ["", f"Ragged shapes ({r['site']}: {r['calls']} calls, 1 x {r['heads']} x {r['queries'][0]}-"
                  f"{r['queries'][1]} x {r['keys']} x {r['head_dim']}, {r['dtype']}): host ms per call until it "
                  "returns, on shapes not seen before and on the same shapes again", "",
                  "| kernel | new shapes | seen shapes |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['new_shapes']} | {v['seen_shapes']} |" for k, v in r["host_ms"].items()]
        lines += [f"| {k} | refused: {v} | |" for k, v in r["refused"].items()]
    if report.get("ragged_cells"):
        cells = report["ragged_cells"]
        lines += ["", f"FlashVDM's per-cell steps in PyTorch's kernel order, host ms per cell ({cells['calls']} "
                  "new cell sizes): " + ", ".join(f"{k} {v}" for k, v in cells["host_ms_per_cell"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def merged_table(path: Path, report: dict) -> dict:
    """The kernel table with this run's rows in place of its device's old ones; other devices'
    rows (and their machine entries) are kept."""
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    mine = (report["machine"]["device"], report["machine"]["capability"])
    machines = [m for m in old.get("machines", [old["machine"]] if "machine" in old else [])
                if (m["device"], m["capability"]) != mine]  # fmt: skip
    rows = [r for r in old["rows"] if (r["device"], r["capability"]) != mine]
    return {"bench": report["bench"], "date": report["date"], "machines": [*machines, report["machine"]],
            "tolerance": report["tolerance"], "rows": [*rows, *report["rows"]]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="results JSON (measure on this machine's GPU)")
    p.add_argument("--table", help="also write the kernel table the package reads")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ragged-calls", type=int, default=200, help="ragged FlashVDM shapes timed (0: none)")
    p.add_argument("--report", help="an existing results JSON: write its markdown (--md) only")
    p.add_argument("--md", help="markdown page")
    args = p.parse_args()
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        report = run(args)
        Path(args.json).write_text(json.dumps(report, indent=1))
        if args.table:
            Path(args.table).write_text(json.dumps(merged_table(Path(args.table), report), indent=1))
    if args.md:
        Path(args.md).write_text(markdown(report))


if __name__ == "__main__":
    main()
