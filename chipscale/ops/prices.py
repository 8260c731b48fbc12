"""The dated price table ``chipscale plan`` costs a run with: bundled for us-east-1
on-demand (``prices-us-east-1.json`` beside this module), or a file of the same shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from chipscale.errors import ChipscaleError

#: The bundled table's file name, next to this module (package data).
BUNDLED = "prices-us-east-1.json"
#: The flat per-unit prices every table must give.
UNIT_PRICES = (
    "lambda_usd_per_gb_second",
    "lambda_usd_per_million_requests",
    "sqs_usd_per_million_requests",
    "rds_proxy_usd_per_vcpu_hour",
    "rds_proxy_min_vcpus",
    "load_balancer_usd_per_hour",
    "load_balancer_usd_per_gb_processed",
)


class PriceError(ChipscaleError):
    """A price table that cannot be read, or an instance it does not price."""


@dataclass(frozen=True, slots=True)
class Instance:
    name: str
    usd_per_hour: float
    gpus: int


@dataclass(frozen=True, slots=True)
class PriceTable:
    region: str
    date: str
    source: str
    path: str
    instances: dict[str, Instance]
    databases: dict[str, float]
    unit: dict[str, float]

    def instance(self, name: str) -> Instance:
        """The instance type ``name``; an unknown one is a one-line error naming it."""
        found = self.instances.get(name)
        if found is None:
            families = sorted({n.split(".")[0] for n in self.instances})
            raise PriceError(
                f"unknown instance type {name!r}: the price table {self.path} ({self.date}) "
                f"prices the {', '.join(families)} families, e.g. "
                f"{', '.join(sorted(self.instances)[:3])}"
            )
        return found

    def database(self, name: str) -> float:
        """Dollars an hour of RDS instance class ``name`` (without ``db.``)."""
        name = name.removeprefix("db.")
        if name not in self.databases:
            raise PriceError(
                f"unknown database instance class {name!r}: the price table {self.path} "
                f"prices {', '.join(sorted(self.databases))}"
            )
        return self.databases[name]


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The bundled table, or the JSON file ``path`` (same keys; see the bundled one)."""
    if path is None:
        text = resources.files("chipscale.ops").joinpath(BUNDLED).read_text(encoding="utf-8")
        where = f"bundled {BUNDLED}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PriceError(f"cannot read price table {path}: {exc.strerror or exc}") from None
        where = str(path)
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise PriceError(f"price table {where} is not JSON: {exc}") from None
    return _parse(raw, where)


def _parse(raw: Any, where: str) -> PriceTable:
    if not isinstance(raw, dict):
        raise PriceError(f"price table {where} is not a JSON object")
    missing = [k for k in ("region", "date", "instances", *UNIT_PRICES) if k not in raw]
    if missing:
        raise PriceError(f"price table {where} lacks {', '.join(missing)}")
    try:
        instances = {
            name: Instance(name, float(item["usd_per_hour"]), int(item.get("gpus", 1)))
            for name, item in dict(raw["instances"]).items()
        }
        databases = {k: float(v["usd_per_hour"]) for k, v in dict(raw.get("databases", {})).items()}
        unit = {k: float(raw[k]) for k in UNIT_PRICES}
    except (KeyError, TypeError, ValueError) as exc:
        raise PriceError(f"price table {where}: bad entry ({exc})") from None
    return PriceTable(
        region=str(raw["region"]),
        date=str(raw["date"]),
        source=str(raw.get("source", "")),
        path=where,
        instances=instances,
        databases=databases,
        unit=unit,
    )
