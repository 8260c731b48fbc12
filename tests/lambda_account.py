"""A recorded GetAccountSettings answer for a Lambda client that otherwise talks to moto.

moto 5.2 does not implement GetAccountSettings (it answers 404 "Not yet implemented"), and
botocore's Stubber takes over every call of a client. So one hook, the one Stubber itself
uses (``before-call``), answers that operation alone with a recorded response, checked
against the service model as Stubber checks it; every other call still goes to moto.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from botocore.awsrequest import AWSResponse
from botocore.validate import validate_parameters


def recorded_account_settings(total: int, unreserved: int) -> dict[str, Any]:
    """A GetAccountSettings answer as AWS sends it (a new account: 10 and 10)."""
    return {
        "AccountLimit": {
            "TotalCodeSize": 80530636800,
            "CodeSizeUnzipped": 262144000,
            "CodeSizeZipped": 52428800,
            "ConcurrentExecutions": total,
            "UnreservedConcurrentExecutions": unreserved,
        },
        "AccountUsage": {"TotalCodeSize": 16384, "FunctionCount": 3},
    }


@dataclass
class RecordedAccount:
    """What GetAccountSettings answers on the client it is installed on; change it mid-test.

    ``error`` set: that AWS error code instead (HTTP 403), as a role without the permission
    gets. ``calls`` counts the answers given.
    """

    total: int = 1000
    unreserved: int = 1000
    error: str | None = None
    calls: int = 0

    def install(self, client: Any) -> RecordedAccount:
        client.meta.events.register("before-call.lambda.GetAccountSettings", self._answer)
        return self

    def _answer(self, model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        self.calls += 1
        if self.error:
            error = {"Code": self.error, "Message": "User is not authorized to perform this"}
            return AWSResponse(None, 403, {}, None), {"Error": error, "ResponseMetadata": {}}
        answer = recorded_account_settings(self.total, self.unreserved)
        validate_parameters(answer, model.output_shape)
        return AWSResponse(None, 200, {}, None), answer
