"""The cloud side of the pipeline: push to SQS, the SQS worker, database credentials."""
