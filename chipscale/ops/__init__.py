"""Operating a deployed stack: stack outputs, shared AWS reads, verify, monitor, diagnosis,
tune, the fleet controller, Prometheus metrics, redrive, and the operations Lambda's client
and actions."""
