"""Training: DeepSpeed config, loggers, checkpoints and the loop."""
