"""Inference: generation with KV caches, and the inference benchmark."""
