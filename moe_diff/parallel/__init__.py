"""Parallelism applied to a finished model from outside; the model file knows nothing of ranks."""
