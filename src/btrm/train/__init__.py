"""Training: the optimizer and lr schedule, the DeepSpeed config, loggers, checkpoints and the loop."""
