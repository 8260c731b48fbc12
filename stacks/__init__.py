"""The chipscale CDK app: one construct per concern, wired by ``stacks.stack.ChipscaleStack``."""
