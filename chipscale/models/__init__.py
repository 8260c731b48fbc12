"""The predictor port and its adapters (in process, TorchServe), serving, the demo model."""
