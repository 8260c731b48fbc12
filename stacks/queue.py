"""Queue: the SQS standard queue of tile packs and its dead-letter queue.

The visibility timeout is 6x the worker's timeout plus the batching window (AWS's rule for
Lambda event sources): a message is not handed out again while a slow invocation still holds
it. A message that fails ``maxReceiveCount`` times moves to the DLQ; the redrive path back is
SQS's own ``start-message-move-task`` (docs/deploy.md).
"""

from __future__ import annotations

from aws_cdk import Annotations, Duration
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from stacks.config import DeploymentConfig

#: AWS's advice for a queue feeding a Lambda event source: throttled batches spend receives.
MIN_ADVISED_RECEIVE_COUNT = 5


class TileQueue(Construct):
    """The work queue and its dead-letter queue, both encrypted and SSL-only."""

    def __init__(self, scope: Construct, construct_id: str, *, config: DeploymentConfig) -> None:
        super().__init__(scope, construct_id)
        self.dead_letter_queue = sqs.Queue(
            self,
            "DeadLetters",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(14),
        )
        self.queue = sqs.Queue(
            self,
            "Packs",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            visibility_timeout=Duration.seconds(config.visibility_timeout_seconds),
            retention_period=Duration.days(14),
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=self.dead_letter_queue, max_receive_count=config.max_receive_count
            ),
        )
        if config.max_receive_count < MIN_ADVISED_RECEIVE_COUNT:
            Annotations.of(self.queue).add_warning_v2(
                "chipscale:maxReceiveCount",
                f"maxReceiveCount {config.max_receive_count} is below the "
                f"{MIN_ADVISED_RECEIVE_COUNT} AWS advises for a Lambda event source: a burst of "
                "throttled batches can move good messages to the dead-letter queue.",
            )
