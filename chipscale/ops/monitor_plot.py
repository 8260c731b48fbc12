"""``chipscale monitor --plot``: GPU utilisation per GPU and tiles/s over hours, read from
CloudWatch (:func:`collect_history`) and drawn as a PNG (:func:`plot`, matplotlib imported
only then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from chipscale.extras import missing_message
from chipscale.ops.aws import Fleet
from chipscale.ops.cloudwatch import build_queries, get_metric_data, minutes_of, worker_series
from chipscale.ops.monitor import Clients, MonitorError
from chipscale.ops.snapshot import Minute, Window

if TYPE_CHECKING:
    from chipscale.ops.stack_outputs import StackOutputs


#: Series of a plot: at most this many points each (the period grows with the hours asked).
MAX_PLOT_POINTS = 1440


@dataclass(frozen=True, slots=True)
class History:
    """GPU utilisation per GPU and tiles/s over hours: what ``monitor --plot`` draws."""

    window: Window
    minutes: tuple[Minute, ...]

    def gpu_keys(self) -> list[str]:
        return sorted({k for m in self.minutes for k in m.gpu_utilization})


def plot_period(hours: float) -> int:
    """A period (a multiple of 60 s) giving at most :data:`MAX_PLOT_POINTS` points."""
    minutes = math.ceil(hours * 60 / MAX_PLOT_POINTS)
    return 60 * max(1, minutes)


def collect_history(
    outputs: StackOutputs,
    clients: Clients,
    fleet: Fleet,
    *,
    hours: float = 3.0,
    now: datetime | None = None,
) -> History:
    """GPU utilisation of every GPU of ``fleet`` (its instances, and those that left the group
    but EC2 still lists) and the worker's tiles over the last ``hours``."""
    window = Window.ending(
        now or datetime.now(UTC), timedelta(hours=hours), period_s=plot_period(hours)
    )
    slots = [(i, index) for i in fleet.instances for index in range(i.gpus)]
    queries = build_queries(
        outputs,
        slots,
        window.period_s,
        gpu_kinds=("u",),
        worker_keys=("ok", "empty", "error"),
        aws=False,
    )
    series = get_metric_data(clients.cloudwatch, queries, window)
    work = worker_series(series, outputs, None)
    return History(window, minutes_of(window, slots, series, work))


def plot(history: History, path: str, *, title: str = "") -> None:
    """A PNG: GPU utilisation per GPU (top) and tiles/s (bottom) against time.

    matplotlib is imported here (Agg, no display): the CLI and the Lambda bundle must not
    need it for anything else.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MonitorError(missing_message("matplotlib", "--plot")) from None
    period = history.window.period_s
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    try:
        for key in history.gpu_keys():
            points = [
                (m.start, m.gpu_utilization[key])
                for m in history.minutes
                if key in m.gpu_utilization
            ]
            if points:
                top.plot(*zip(*points, strict=True), label=key, linewidth=1.2)
        top.set_ylabel("GPU utilisation (%)")
        top.set_ylim(0, 105)
        if history.gpu_keys():
            top.legend(loc="upper left", fontsize="small", ncol=2)
        top.grid(alpha=0.3)
        stamps = [m.start for m in history.minutes]
        bottom.plot(stamps, [m.tiles / period for m in history.minutes], color="tab:green")
        bottom.set_ylabel("tiles/s")
        bottom.set_xlabel("UTC")
        bottom.grid(alpha=0.3)
        top.set_title(title or "chipscale")
        figure.autofmt_xdate()
        figure.tight_layout()
        from chipscale.atomic import atomic_write

        with atomic_write(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)
