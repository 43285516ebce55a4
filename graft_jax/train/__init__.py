"""Training: sharding, checkpoints, stage-1 distillation and stage-2 fine-tuning."""
