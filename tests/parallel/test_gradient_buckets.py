"""The gradients sync_gradients averages by hand go in consecutive buckets of at most BUCKET_BYTES."""

import pytest
import torch

from moe_diff.parallel import gradients


def test_buckets_keep_the_order_and_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gradients, "BUCKET_BYTES", 40)  # 10 float32 elements
    grads = [torch.zeros(n) for n in (4, 4, 3, 12, 1, 9)]
    buckets = gradients._buckets(grads)
    assert [[len(g) for g in bucket] for bucket in buckets] == [[4, 4], [3], [12], [1, 9]]
    flat = [g for bucket in buckets for g in bucket]
    assert len(flat) == len(grads) and all(a is b for a, b in zip(flat, grads, strict=True))  # the same, in order
    assert [[len(g) for g in bucket] for bucket in gradients._buckets(grads[:1])] == [[4]]
