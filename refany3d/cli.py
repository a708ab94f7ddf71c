"""`refany3d` command line: builds settings objects from flags and hands them to the flows.

This is the only module that parses arguments; the library takes settings objects.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from refany3d import __version__
from refany3d.config import (
    BuildSettings,
    SettingsError,
    describe,
    load_settings,
    parse_overrides,
)
from refany3d.preflight import check_writable, preflight
from refany3d.stages.dag import STAGES


def _prefect_defaults() -> None:
    # Offline machines: no analytics, and give the ephemeral server time to start on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def _add_settings_args(p: argparse.ArgumentParser, example: str) -> None:
    """--config and --set; `example` is one of the command's own settings (`section.field=value`)."""
    p.add_argument("--config", metavar="FILE", help="YAML or TOML settings file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=f"override one setting (repeatable), e.g. --set {example}",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refany3d",
        description="Build the RefAny3D pose-aligned 3D-asset dataset and train the RefAny3D model.",
    )
    parser.add_argument("--version", action="version", version=f"refany3d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser("build", help="build the dataset (Prefect flow build-dataset)")
    build.add_argument(
        "--source", choices=["synthetic", "subjects200k"], help="row source (default: synthetic)"
    )
    build.add_argument(
        "--data-files", metavar="GLOB", help="Subjects200K-format Parquet files (glob or fsspec URL)"
    )
    build.add_argument("--limit", type=int, metavar="N", help="read at most N source rows (0 = all rows)")
    build.add_argument("--out", metavar="URL", help="output directory or fsspec URL")
    build.add_argument(
        "--until", choices=list(STAGES), help="run STAGE and its ancestors only, write what reached it"
    )
    build.add_argument("--name", help="dataset name (flow run name)")
    build.add_argument(
        "--runner", choices=["thread", "dask"], help="task runner for in-flow fan-out (runtime.runner)"
    )
    build.add_argument(
        "--partitions",
        type=int,
        metavar="N",
        help="split the source into N row ranges, each a run of the build deployment on its pool's "
        "workers (needs PREFECT_API_URL, `refany3d deploy` and workers; docs/operating.md)",
    )
    build.add_argument(
        "--deployment",
        metavar="NAME",
        help="the deployment that runs the partitions (default build-dataset/cpu, /gpu for cuda)",
    )
    _add_settings_args(build, "verify.min_iou=0.85")

    synth = sub.add_parser("synth", help="write the embedded synthetic source (Subjects200K format + truth)")
    synth.add_argument("--n", type=int, default=8, help="pair rows to generate")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, metavar="DIR")

    train = sub.add_parser(
        "train",
        help="train RefAny3D on shards (one process, or each rank under torchrun / accelerate launch)",
    )
    train.add_argument(
        "--data",
        metavar="URL",
        help="dataset directory, shard directory, glob or one shard file (data.shards)",
    )
    train.add_argument("--out", metavar="DIR", help="checkpoints, samples and logs (checkpoint.dir)")
    train.add_argument("--steps", type=int, metavar="N", help="train up to step N (optim.steps)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    _add_settings_args(train, "optim.lr=0.5")

    deploy = sub.add_parser("deploy", help="register build-dataset (and train) on the cpu/gpu work pools")
    deploy.add_argument(
        "--pool",
        dest="pools",
        action="append",
        choices=["cpu", "gpu"],
        help="work pool (repeatable; default both)",
    )
    deploy.add_argument(
        "--build-cron",
        metavar="CRON",
        help="cron schedule of the build deployments (none: remove; default: keep the existing ones)",
    )
    deploy.add_argument(
        "--cron",
        metavar="CRON",
        help="cron schedule of the train deployment (none: remove; default: keep the existing ones)",
    )
    deploy.add_argument(
        "--zombie-after",
        type=int,
        default=90,
        metavar="SECONDS",
        help="mark a flow run Crashed after this long without a heartbeat (its worker died); "
        "a partitioned build then starts its partition again",
    )
    _add_settings_args(deploy, "runtime.gpu_slots=2")
    deploy.add_argument(
        "--train-set",
        dest="train_overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one training setting of train/cpu and train/gpu (repeatable), e.g. --train-set optim.lr=0.5",
    )

    serve = sub.add_parser("serve", help="serve the deployments from this process (no work pool or worker)")
    serve.add_argument("--build-cron", metavar="CRON", help="cron schedule of the build deployment")
    serve.add_argument("--cron", metavar="CRON", help="cron schedule of the train deployment (retraining)")
    _add_settings_args(serve, "runtime.workers=4")

    sample = sub.add_parser("sample", help="generate an image and its point map of a 3D asset")
    sample.add_argument(
        "--asset", required=True, metavar="MESH", help="GLB/GLTF/OBJ/PLY mesh (textured or vertex-coloured)"
    )
    sample.add_argument("--prompt", required=True, metavar="TEXT")
    sample.add_argument(
        "--lora",
        metavar="DIR",
        help="a training run's directory (its newest checkpoint), one checkpoint's, or a promoted.json "
        "pointer of scheduled retraining; none = untrained adapters",
    )
    sample.add_argument(
        "--base",
        metavar="DIR",
        help="base model (model.pretrained: a FLUX.1-dev snapshot directory); default: the one the "
        "checkpoint's config.json names",
    )
    sample.add_argument(
        "--out", required=True, metavar="DIR", help="directory for the images and contact sheet"
    )
    sample.add_argument(
        "--views", type=int, metavar="N", help="orbit views of the asset (render.views; default 8)"
    )
    sample.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="denoising steps (sampler.steps; default: the checkpoint's, else 28)",
    )
    sample.add_argument("--guidance", type=float, metavar="G", help="guidance embedding (default 3.5)")
    sample.add_argument(
        "--image-guidance",
        type=float,
        metavar="S",
        help="image guidance scale (second pass, blank references)",
    )
    sample.add_argument("--seed", type=int, metavar="N", help="noise seed (sampler.seed; default 0)")
    _add_settings_args(sample, "sampler.steps=20")

    evaluate = sub.add_parser("evaluate", help="metrics of generated samples (Prefect flow evaluate)")
    evaluate.add_argument(
        "--samples", required=True, metavar="DIR", help="what `refany3d sample` wrote (one or many)"
    )
    evaluate.add_argument(
        "--dataset", metavar="URL", help="shards whose meshes stand in for samples without asset.glb"
    )
    evaluate.add_argument(
        "--generate",
        action="store_true",
        help="first draw one sample per --dataset asset into --samples with the pipeline of --lora",
    )
    evaluate.add_argument(
        "--lora", metavar="DIR", help="with --generate: the checkpoint (none = untrained adapters)"
    )
    evaluate.add_argument(
        "--limit", type=int, default=0, metavar="N", help="with --generate: the first N assets (0 = all)"
    )
    evaluate.add_argument(
        "--out",
        metavar="URL",
        help="directory or fsspec URL (s3://...) for metrics.json and, with --generate, the samples "
        "drawn (default: --samples)",
    )
    _add_settings_args(evaluate, "metrics.gallery_samples=4")

    config = sub.add_parser(
        "config", help="print every build setting with its value and doc (--config/--set applied)"
    )
    config.add_argument("--train", action="store_true", help="training settings instead")
    config.add_argument("--sample", action="store_true", help="sampling settings instead")
    config.add_argument("--evaluate", action="store_true", help="evaluation settings instead")
    _add_settings_args(config, "verify.min_iou=0.85 (a setting of the chosen command)")
    return parser


def _build_settings(args: argparse.Namespace) -> BuildSettings:
    flags: dict[str, Any] = {
        "source.kind": args.source,
        "source.data_files": args.data_files,
        "source.limit": args.limit,
        "storage.out": args.out,
        "until": args.until,
        "name": args.name,
        "runtime.runner": getattr(args, "runner", None),
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.data_files and not args.source:
        overrides["source.kind"] = "subjects200k"
    overrides.update(parse_overrides(args.overrides))
    return load_settings(BuildSettings, args.config, overrides)


def _print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from refany3d.storage.card import yield_table

    table = Table(title="per-stage yield")
    for col in ("stage", "in", "kept", "dropped", "reasons"):
        table.add_column(col, justify="left" if col in ("stage", "reasons") else "right")
    for row in yield_table(result["stats"]):
        table.add_row(*(str(row[c]) for c in ("stage", "in", "kept", "dropped", "reasons")))
    console = Console()
    console.print(table)
    console.print(f"{len(result['shards'])} shard(s), card and stats in [bold]{result['out']}[/bold]")
    from refany3d.flows.deployments import api_url

    api = api_url()
    if api:
        run = f"/runs/flow-run/{result['flow_run_id']}" if result.get("flow_run_id") else "/runs"
        console.print(f"open the run in the Prefect UI: {api.removesuffix('/api')}{run}")
    else:
        console.print(
            "ran on an ephemeral Prefect server; start `prefect server start` to keep runs in the UI"
        )


def _cmd_build(args: argparse.Namespace) -> int:
    settings = _build_settings(args)
    # Before Prefect starts: a bad file, setting or output fails here, in one line (exit 2).
    for reject in preflight(settings):
        print(f"refany3d build: skipping {reject.detail} (source.skip_bad_files)", file=sys.stderr)
    _prefect_defaults()
    if args.partitions is not None:
        return _build_partitioned(args, settings)
    from refany3d.flows.build_dataset import build_dataset

    result = build_dataset(settings)
    _print_summary(result)
    return 0


def _build_partitioned(args: argparse.Namespace, settings: BuildSettings) -> int:
    """`build --partitions N`: this process is the parent; the pool's workers build the partitions."""
    from refany3d.flows.deployments import _absolute_paths, api_url
    from refany3d.flows.partitioned import build_dataset_partitioned, child_deployment

    if args.partitions < 1:
        raise SettingsError(f"--partitions: {args.partitions} is not a positive number")
    if not api_url():
        raise SettingsError(
            "--partitions: no Prefect API; start a server, set PREFECT_API_URL, run `refany3d deploy` "
            "and start workers (docs/operating.md)"
        )
    deployment = args.deployment or child_deployment(settings)
    _check_deployment(deployment)
    settings = _absolute_paths(settings)  # the workers run in other working directories
    state = build_dataset_partitioned(settings, args.partitions, deployment, return_state=True)
    if not state.is_completed():
        print(f"refany3d build: failed: {' '.join((state.message or state.name).split())}", file=sys.stderr)
        return 1
    _print_summary(state.result())
    return 0


def _check_deployment(name: str) -> None:
    """SettingsError (one line) unless deployment `name` is registered with the API server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise SettingsError(
                f"--deployment: {name!r} is not registered with {client.api_url}; run `refany3d deploy`"
            ) from None


def _train_settings(args: argparse.Namespace):
    """(settings, the keys the user set: a resumed run takes the others from its checkpoint)."""
    from refany3d.config import TrainSettings, explicit_keys

    flags = {"data.shards": args.data, "checkpoint.dir": args.out, "optim.steps": args.steps}
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_overrides(args.overrides))
    settings = load_settings(TrainSettings, args.config, overrides)
    return settings, explicit_keys(TrainSettings, args.config, overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from refany3d.train.trainer import resolve_device

    settings, explicit = _train_settings(args)
    settings = resolve_device(settings)  # cuda without CUDA: one line, before any work
    from refany3d.models.flux.components import check_pretrained
    from refany3d.train.data import shard_files

    if settings.model.pretrained:
        check_pretrained(settings.model.pretrained)
    if not shard_files(settings.data.shards):
        raise FileNotFoundError(f"data.shards: no Parquet shards at {settings.data.shards!r}")
    from refany3d.train.run import configure_logging, run_training

    configure_logging()
    result = run_training(settings, resume=args.resume, explicit=explicit)
    if int(os.environ.get("RANK", "0")) == 0:
        s = result.summary
        print(f"base model: {s['base']}")
        print(
            f"trained to step {s['steps']} (resumed from {s['resumed_from']}): loss {s['first_loss']:.5f} -> {s['last_loss']:.5f}"
        )
        print(f"skipped / encoded / cache hits: {s['counts']}")
        print(f"checkpoints, samples, metrics.jsonl and summary.json in {result.out}")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from refany3d.flows.deployments import HEARTBEAT_S, api_url, deploy

    if args.zombie_after <= HEARTBEAT_S:
        raise SettingsError(
            f"--zombie-after: {args.zombie_after} s is not longer than the {HEARTBEAT_S} s between "
            "heartbeats; healthy runs would be marked Crashed"
        )
    _prefect_defaults()

    if not api_url():
        print(
            "refany3d deploy: error: no Prefect API; start `prefect server start` and set PREFECT_API_URL",
            file=sys.stderr,
        )
        return 2
    from refany3d.config import TrainSettings
    from refany3d.flows.deployments import HOLDOUT_FRACTION

    base = load_settings(BuildSettings, args.config, parse_overrides(args.overrides))
    train = {"data.holdout_fraction": HOLDOUT_FRACTION, **parse_overrides(args.train_overrides)}
    train_base = load_settings(TrainSettings, None, train)
    pools = tuple(args.pools or ("cpu", "gpu"))
    for row in deploy(pools, base, args.build_cron, args.cron, train_base, args.zombie_after):
        print(f"{row.name:22} pool {row.pool:4} {row.status}")
    print(
        f"start a worker per pool: prefect worker start --pool cpu  (and --pool gpu on GPU machines); API {api_url()}"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from refany3d.flows.deployments import serve

    serve(
        load_settings(BuildSettings, args.config, parse_overrides(args.overrides)), args.build_cron, args.cron
    )
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from refany3d.synthetic import generate

    generate(args.out, args.n, args.seed)
    print(f"wrote {args.n} synthetic pair rows to {args.out}/data and ground truth to {args.out}/truth")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from refany3d.config import SampleSettings
    from refany3d.sampling.assets import AssetError, load_asset

    flags: dict[str, Any] = {
        "render.views": args.views,
        "model.num_views": args.views,
        "sampler.steps": args.steps,
        "sampler.guidance": args.guidance,
        "sampler.image_guidance": args.image_guidance,
        "sampler.seed": args.seed,
        "model.pretrained": args.base,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_overrides(args.overrides))
    settings = load_settings(SampleSettings, args.config, overrides)
    try:
        mesh = load_asset(args.asset)  # a bad asset fails before any weights load
    except AssetError as err:
        print(f"refany3d sample: error: {err}", file=sys.stderr)
        return 2
    from refany3d.config import explicit_keys
    from refany3d.sampling.pipeline import RefAny3DPipeline, resolve_adapters

    if args.lora:
        resolve_adapters(args.lora)  # a wrong --lora fails before the weights load
    else:
        print("refany3d sample: no --lora: untrained adapters (the base model's behaviour)", file=sys.stderr)
    # the model flags come from the checkpoint; only those the user set can conflict with it
    explicit = explicit_keys(SampleSettings, args.config, overrides)
    pipe = RefAny3DPipeline.from_pretrained(args.lora, base=args.base, settings=settings, explicit=explicit)
    try:
        sample = pipe(mesh, args.prompt)
    except AssetError as err:  # e.g. an orbit view that shows nothing of the asset
        print(
            f"refany3d sample: error: {str(err).replace('asset:', f'asset {args.asset!r}:', 1)}",
            file=sys.stderr,
        )
        return 2
    out = sample.save(args.out, pipe.settings)
    print(f"wrote {out / 'image.png'}, point_map.png and contact_sheet.png ({pipe.components.label})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from refany3d.config import EvaluateSettings
    from refany3d.evaluate.run import find_samples, metrics_table

    settings = load_settings(EvaluateSettings, args.config, parse_overrides(args.overrides))
    if args.generate:  # bad inputs: one line, before Prefect starts
        from refany3d.evaluate.generate import dataset_assets
        from refany3d.train.checkpoint import resolve_adapters

        if not args.dataset:
            raise SettingsError("--generate: needs --dataset (the shards whose assets are drawn)")
        if args.lora:
            resolve_adapters(args.lora)
        if next(dataset_assets(args.dataset, 1), None) is None:
            raise FileNotFoundError(f"--dataset {args.dataset!r}: no row with a mesh (mesh_glb)")
    elif args.lora:
        raise SettingsError("--lora: only with --generate (scoring existing samples needs no model)")
    else:
        find_samples(args.samples)  # no samples: one line, before Prefect starts
    if args.out:
        check_writable(args.out, "--out")  # a missing bucket: one line, before any work
    _prefect_defaults()
    from refany3d.flows.evaluate import evaluate

    report = evaluate(
        args.samples,
        settings,
        args.dataset or "",
        generate=args.generate,
        lora=args.lora,
        limit=args.limit,
        out=args.out or "",
    )
    for line in metrics_table(report):
        print(line)
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {report['path']}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from refany3d.config import EvaluateSettings, SampleSettings, TrainSettings

    chosen = [
        c
        for flag, c in (
            (args.train, TrainSettings),
            (args.sample, SampleSettings),
            (args.evaluate, EvaluateSettings),
        )
        if flag
    ]
    cls = chosen[0] if chosen else BuildSettings
    # the values the command would run with (file < environment < --set), as the command loads them
    current = load_settings(cls, args.config, parse_overrides(args.overrides))
    for name, value, doc, default in describe(cls, current):
        changed = "" if value == default else f" [default {default!r}]"
        print(f"{name:34} {value!r:28} {doc}{changed}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "build": _cmd_build,
        "train": _cmd_train,
        "synth": _cmd_synth,
        "config": _cmd_config,
        "deploy": _cmd_deploy,
        "serve": _cmd_serve,
        "sample": _cmd_sample,
        "evaluate": _cmd_evaluate,
    }
    try:
        code = commands[args.command](args)
    except (SettingsError, FileNotFoundError, NotImplementedError) as err:
        message = " ".join(str(err).split())  # one line, whatever the cause's own formatting
        print(f"refany3d {args.command}: error: {message}", file=sys.stderr)
        code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
