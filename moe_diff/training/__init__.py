"""The training job's parts: the trainer and its loop, optimizer, metrics, the run-directory lock, the forward
check; `moe_diff.train` runs them as users do."""
