"""Operating a deployed stack: outputs, verify, monitor, diagnosis, tune, fleet, redrive."""
