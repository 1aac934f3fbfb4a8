"""Training: parameter groups and optimizer (``optim``), sharding, checkpoints, the loop."""
