"""Training: losses, optimizers and schedules, the sharded train step, checkpoints, metrics, the loop."""
