"""SQS worker Lambda: a batch of pack messages in, partial batch failures out.

Thin on purpose: :class:`chipscale.cloud.sqs_batch.PackBatchProcessor` (Powertools' BatchProcessor)
runs each record through :meth:`chipscale.cloud.queue_worker.QueueWorker.predict` (which
reads the next record's pack while it predicts), stores the batch's rows in one write, and
reports only the records that raised or whose rows were not stored, so one failing message
never sends its neighbours back. Connections live for the
container.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities.batch import process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from chipscale import names
from chipscale.cloud.db_credentials import url_from_environment
from chipscale.cloud.queue_worker import QueueWorker, WorkerSettings
from chipscale.cloud.sqs_batch import PackBatchProcessor
from chipscale.models.predictors import open_predictor
from chipscale.pipeline.process import PackResults
from chipscale.results import open_store

logger = Logger(service=names.WORKER_SERVICE)
metrics = Metrics(namespace=names.METRICS_NAMESPACE, service=names.WORKER_SERVICE)
# The function's name as a dimension: two stacks in one account and region keep their tiles/s
# apart (the dashboard and `chipscale monitor` read both dimensions).
metrics.set_default_dimensions(
    **{names.WORKER_FUNCTION_DIMENSION: os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "local")}
)


@functools.cache
def worker() -> QueueWorker:
    """The container's worker, built on the first invocation (not at import)."""
    secrets = boto3.client("secretsmanager")
    return QueueWorker(
        WorkerSettings.from_environ(),
        open_predictor=open_predictor,
        open_store=lambda: open_store(url_from_environment(secrets), create=False),
        metrics=metrics,
    )


processor = PackBatchProcessor(
    lambda packs: worker().store_packs(packs),
    end=lambda: worker().end_batch(),
    logger=logger,
)


def record_handler(record: SQSRecord, lambda_context: Any) -> PackResults | None:
    remaining_s = lambda_context.get_remaining_time_in_millis() / 1000.0
    upcoming = processor.upcoming  # its pack is read while this record's is predicted
    then = None if upcoming is None else (upcoming.message_id, upcoming.body)
    return worker().predict(record.message_id, record.body, remaining_s=remaining_s, then=then)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
