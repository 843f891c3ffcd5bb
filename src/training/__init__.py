"""Training: losses, optimisers, schedules, SyncBatchNorm, the training loop and one fold end to end (or a classifier
on frozen features)."""
