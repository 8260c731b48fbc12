"""``chipscale model info``, ``model package`` (a TorchServe archive) and ``serve`` (a local
TorchServe)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from chipscale.cli.options import F
from chipscale.errors import ChipscaleError
from chipscale.models.serving import DEFAULT_SAMPLES, DEFAULT_TOLERANCE, ServingConfig, TorchServe
from chipscale.names import INFERENCE_PORT


@click.group()
def model() -> None:
    """Inspect and package model files."""


@model.command("info")
@click.argument("path", type=click.Path(dir_okay=False))
def model_info(path: str) -> None:
    """Print the metadata a model file carries (name, version, classes, bands, scaling)."""
    from chipscale.models.predictors import read_model_metadata

    click.echo(json.dumps(read_model_metadata(path), indent=2))


def _serving_options(fn: F) -> F:
    """The model-config knobs of a .mar (see chipscale.models.serving.ServingConfig)."""
    d = ServingConfig()
    options = [
        click.option("--batch-size", type=click.IntRange(1), default=d.batch_size,
                     show_default=True, help="Requests TorchServe groups into one handler call."),
        click.option("--max-batch-delay", type=click.IntRange(0), default=d.max_batch_delay_ms,
                     show_default=True, help="Milliseconds TorchServe waits to fill a batch."),
        click.option("--workers", type=click.IntRange(1), default=d.workers, show_default=True,
                     help="Starting workers (GPU hosts scale to workers-per-GPU x GPUs)."),
        click.option("--response-timeout", type=click.IntRange(1),
                     default=d.response_timeout_s, show_default=True,
                     help="Seconds before TorchServe gives up on a handler call."),
        click.option("--sub-batch", type=click.IntRange(1), default=d.sub_batch,
                     show_default=True, help="Tiles the handler runs through the model at once."),
        click.option("--threads", type=click.IntRange(1), default=d.threads, show_default=True,
                     help="Torch CPU threads per worker (no GPU)."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def _serving_config(options: dict[str, int]) -> ServingConfig:
    return ServingConfig(
        batch_size=options["batch_size"],
        max_batch_delay_ms=options["max_batch_delay"],
        workers=options["workers"],
        response_timeout_s=options["response_timeout"],
        sub_batch=options["sub_batch"],
        threads=options["threads"],
    )


def _inference_options(fn: F) -> F:
    """Inference settings written into the packaged model, after a drift check."""
    options = [
        click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]),
                     help="Run the model under autocast at this precision (default: the file's)."),
        click.option("--channels-last/--no-channels-last", default=None,
                     help="NHWC weights and input (default: the file's)."),
        click.option("--freeze/--no-freeze", default=None,
                     help="TorchScript: torch.jit.freeze + optimize_for_inference."),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help=".pt2: torch.compile at load (eager, and said so, if it cannot)."),
        click.option("--cudnn-benchmark/--no-cudnn-benchmark", default=None,
                     help="CUDA: let cuDNN time its algorithms (warm-up at load)."),
        click.option("--tolerance", type=click.FloatRange(0), default=DEFAULT_TOLERANCE,
                     show_default=True,
                     help="Largest score change against fp32 accepted on the sample tiles."),
        click.option("--sample-source", metavar="RASTER",
                     help="Raster (path or URL) the sample tiles are read from "
                          "(default: synthetic tiles)."),
        click.option("--samples", type=click.IntRange(1), default=DEFAULT_SAMPLES,
                     show_default=True, help="Sample tiles for the drift check."),
        click.option("--check-device", default="auto", show_default=True,
                     help="Device of the drift check (auto: CUDA when available)."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


@model.command("package")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="TorchServe model name, only if the file has none.")
@click.option("--version", "version", help="Model version, only if the file has none.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Where to write NAME.mar.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing archive.")
@_serving_options
@_inference_options
def model_package(
    path: str,
    name: str | None,
    version: str | None,
    out_dir: str,
    force: bool,
    tolerance: float,
    sample_source: str | None,
    samples: int,
    check_device: str,
    **knobs: Any,
) -> None:
    """Build a TorchServe archive (.mar) of a model file for the GPU hosts.

    The archive holds the chipscale handler, the model runtime, the model (its metadata
    inside: the file is the source of truth, --name and --version only fill gaps) and a
    model-config with the knobs below, set for one GPU by default.

    \b
    --precision and the other inference settings are written into the packaged model's
    metadata once a drift check passes: the model runs as exported (fp32) and with the
    settings on the same sample tiles, and the archive is refused (exit 1) when a score
    moves more than --tolerance. Run it on the GPU kind that will serve (--check-device).
    """
    from chipscale.extras import require
    from chipscale.models.serving import package_model

    for module in ("torch", "model_archiver"):  # the model extra, before any work
        require(module, "chipscale model package", extra="model")
    settings = {k: knobs.pop(k) for k in _SETTING_FLAGS}
    inference = _checked_settings(path, settings, tolerance, sample_source, samples, check_device)
    config = _serving_config(knobs)
    mar = package_model(
        path,
        out_dir,
        name=name,
        version=version,
        config=config,
        force=force,
        inference=inference,
    )
    click.echo(str(mar))
    click.echo(config.to_yaml().rstrip(), err=True)


#: The CLI flags of the inference settings, and each one's InferenceSettings field.
_SETTING_FLAGS = {
    "precision": "precision",
    "channels_last": "channels_last",
    "freeze": "freeze",
    "compile_": "compile",
    "cudnn_benchmark": "cudnn_benchmark",
}


def _checked_settings(
    path: str,
    flags: dict[str, Any],
    tolerance: float,
    sample_source: str | None,
    samples: int,
    device: str,
) -> Any:
    """The file's settings with the flags given, after the drift check (None: no flag)."""
    import dataclasses

    from chipscale.models.drift import DriftRefused, check_drift, sample_tiles
    from chipscale.models.predictors import read_model_metadata
    from model_server import chipscale_runtime as rt

    given = {_SETTING_FLAGS[k]: v for k, v in flags.items() if v is not None}
    if not given:
        return None
    meta = read_model_metadata(path)
    settings = dataclasses.replace(rt.read_metadata(path).inference, **given)
    if settings.is_default():
        return settings
    tiles = sample_tiles(meta, sample_source, samples)
    report = check_drift(
        path,
        settings,
        tiles,
        tolerance=tolerance,
        device=device,
        samples_from=sample_source or "synthetic tiles",
    )
    click.echo(report.line(), err=True)
    if not report.ok:
        raise DriftRefused(
            f"not packaged: the scores drift {report.max_drift:.3g} from fp32, more than the "
            f"tolerance {tolerance:g} (keep fp32, or raise --tolerance if that drift is fine)"
        )
    return settings


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--host",
    default=TorchServe.host,
    show_default=True,
    help="Address inference and metrics listen on (management stays on loopback).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=INFERENCE_PORT, show_default=True,
              help="Inference port (management and metrics take the next two).")  # fmt: skip
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Logs, pid file and sockets (default .chipscale/serve/TIME).")  # fmt: skip
@_serving_options
def serve(model_path: str, host: str, port: int, run_dir: str | None, **knobs: int) -> None:
    """Serve MODEL (a .mar, or a .pt/.pt2 file packaged on the fly) with a local TorchServe.

    Started with model_server/config.properties, the GPU hosts' file; returns control only
    once every worker is READY; Ctrl-C, SIGTERM and SIGHUP stop TorchServe and its workers.
    Ports already in use are refused.
    """
    from chipscale.models.serving import default_run_dir, exit_on_termination, package_model

    run = Path(run_dir) if run_dir else default_run_dir()
    mar = Path(model_path)
    if mar.suffix != ".mar":
        config = _serving_config(knobs)
        mar = package_model(mar, run / "packaged", config=config, force=True)
    server = TorchServe(
        mar, run, host=host, inference_port=port, management_port=port + 1, metrics_port=port + 2
    )
    click.echo(f"Starting TorchServe for {mar.name} (logs in {run / 'logs'})...", err=True)
    with exit_on_termination():
        try:
            server.start()
            click.echo(f"Ready: {server.predictions_url}", err=True)
            click.echo(f"  chipscale run --model {server.predictions_url} ...", err=True)
            click.echo(f"  metrics: {server.metrics_url}/metrics   Ctrl-C stops.", err=True)
            assert server.process is not None
            code = server.process.wait()
            raise ChipscaleError(f"TorchServe stopped (launcher exit {code}); see {run / 'logs'}")
        finally:
            server.stop()
