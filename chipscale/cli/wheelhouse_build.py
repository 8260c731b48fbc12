"""``chipscale wheelhouse build``: the GPU hosts' wheels into the stack's model bucket.

The library is :mod:`chipscale.ops.wheelhouse`; this module resolves the bucket, runs it and
prints what it did.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from chipscale.cli.options import region_option
from chipscale.ops.wheelhouse import DEFAULT_PREFIX, DEFAULT_TORCH_VERSION, HOST_PYTHON


@click.group()
def wheelhouse() -> None:
    """The wheels the GPU hosts install from (no PyPI at boot)."""


@wheelhouse.command("build")
@click.option("--stack", required=True, help="The deployed stack whose model bucket gets it.")
@region_option
@click.option(
    "--torch-version",
    default=DEFAULT_TORCH_VERSION,
    show_default=True,
    help="The stack's torchVersion.",
)
@click.option(
    "--prefix", default=DEFAULT_PREFIX, show_default=True, help="The stack's wheelhousePrefix."
)
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the wheels in this folder (default: a temporary one).",
)
@click.option(
    "--pip-arg",
    "pip_args",
    multiple=True,
    help="Extra pip download argument (repeat), e.g. --pip-arg=--index-url=URL.",
)
def build(
    stack: str,
    region: str | None,
    torch_version: str,
    prefix: str,
    folder: Path | None,
    pip_args: tuple[str, ...],
) -> None:
    """Download the hosts' wheels (torch, TorchServe, ...) for their Python and platform and
    upload them with a manifest to the model bucket's wheelhouse prefix."""
    from chipscale.cloud.aws_session import aws_session
    from chipscale.ops.stack_outputs import resolve_stack
    from chipscale.ops.wheelhouse import download, host_requirements, upload, write_manifest

    session = aws_session(region)
    bucket = resolve_stack(stack, session=session).require("model_bucket")
    with tempfile.TemporaryDirectory(prefix="chipscale-wheelhouse-") as scratch:
        where = folder or Path(scratch)
        click.echo(f"downloading into {where} (Python {HOST_PYTHON}, manylinux x86_64)", err=True)
        download(host_requirements(torch_version), where, HOST_PYTHON, pip_args)
        manifest = write_manifest(where, torch_version, HOST_PYTHON)
        click.echo(
            f"torch {manifest.torch}, CUDA {manifest.cuda}: hosts need NVIDIA driver >= "
            f"{manifest.min_driver}; {len(manifest.wheels)} wheels",
            err=True,
        )
        summary = upload(
            where,
            session.client("s3"),
            bucket,
            prefix,
            lambda key: click.echo(f"upload s3://{bucket}/{key}", err=True),
        )
    click.echo(
        f"s3://{bucket}/{prefix.strip('/')}/: {summary.uploaded} uploaded "
        f"({summary.bytes_sent / 1e6:,.0f} MB), {summary.unchanged} unchanged, "
        f"{summary.deleted} stale deleted"
    )
