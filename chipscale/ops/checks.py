"""``chipscale verify``'s checks as values: each named check returns a :class:`CheckResult`;
:func:`run_checks` runs a list, and one failing (or raising) never stops the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from chipscale.errors import ChipscaleError, one_line

CHECK_QUEUE: Final = "queue"

CHECK_DLQ: Final = "dead-letter queue"

CHECK_EVENT_SOURCE: Final = "event source mapping"

CHECK_WORKER: Final = "worker function"

CHECK_FLEET: Final = "GPU fleet"

CHECK_GPU_QUOTA: Final = "GPU vCPU quota"

CHECK_LAMBDA_QUOTA: Final = "Lambda concurrency quota"

CHECK_ENDPOINT: Final = "model endpoint"

CHECK_SCHEMA: Final = "database schema"


class CheckFailed(ChipscaleError):
    """A check found a problem; its message is the check's detail."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One named check's outcome; ``detail`` says what was seen, and on failure what to do."""

    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: Any) -> CheckResult:
        """Parse one result of the operations Lambda's answer, refusing any other shape."""
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise CheckFailed(f"not a check result: {json.dumps(data)[:200]}")
        return cls(str(data["name"]), data.get("ok") is True, str(data.get("detail", "")))


@dataclass(frozen=True, slots=True)
class Check:
    """A check to run: ``run`` returns its result (or, for a check that runs several at once
    elsewhere, their results); ``covers`` names what is reported failed if it raises."""

    name: str
    run: Callable[[], CheckResult | Sequence[CheckResult]]
    covers: tuple[str, ...] = ()


def run_checks(checks: Sequence[Check]) -> list[CheckResult]:
    """Run every check in order; an exception becomes a failed result under the check's name
    (or each name it covers), so one broken resource never hides the state of the others."""
    results: list[CheckResult] = []
    for check in checks:
        try:
            outcome = check.run()
        except ChipscaleError as exc:  # CheckFailed and chipscale's own: written for users
            detail = one_line(exc)
        except Exception as exc:  # a check must report, whatever broke inside it
            detail = f"{type(exc).__name__}: {one_line(exc)}"
        else:
            results.extend([outcome] if isinstance(outcome, CheckResult) else outcome)
            continue
        results.extend(CheckResult(name, False, detail) for name in check.covers or (check.name,))
    return results


def failures(results: Sequence[CheckResult]) -> list[str]:
    """Names of the failed checks, in order."""
    return [r.name for r in results if not r.ok]
