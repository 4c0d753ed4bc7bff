"""Training: options, DeepSpeed config resolution, engine set-up, loop, checkpoints, metrics."""
