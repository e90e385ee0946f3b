"""A needle-retrieval probe: a key planted at several depths of a long context of distractor keys,
scored by how likely the model finds the planted value against other values it has seen."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from moe_diff.config import ConfigError
from moe_diff.data import Tokenizer
from moe_diff.model import MoEDiffTransformer

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
SHORTEST_CONTEXT = 16  # tokens: room for a few lines around the needle


def _line(key: str, value: str) -> str:
    return f"key {key}: value {value}\n"


def haystack(rng: random.Random, n_lines: int, depth: float) -> tuple[str, str, str, list[str]]:
    """(context with the needle at `depth`, the needle's key, its value, distractor values)."""
    keys = rng.sample([f"{a}{b}{c}" for a in "bdfgkmps" for b in "aeiou" for c in "lnrtx"], n_lines + 1)
    values = [str(rng.randrange(1000, 10000)) for _ in range(n_lines + 1)]
    lines = [_line(k, v) for k, v in zip(keys[1:], values[1:], strict=True)]
    lines.insert(round(depth * n_lines), _line(keys[0], values[0]))
    return "".join(lines) + f"key {keys[0]}: value ", keys[0], values[0], values[1:]


@torch.no_grad()
def value_log_likelihood(model: MoEDiffTransformer, tokenizer: Tokenizer, context: str, value: str) -> float:
    """log p(value | context), summed over the value's tokens."""
    prompt, answer = tokenizer.encode(context), tokenizer.encode(value)
    tokens = torch.tensor(list(prompt) + list(answer), device=model.tok_embeddings.weight.device)[None]
    log_probs = F.log_softmax(model(tokens[:, :-1]).logits.float(), dim=-1)[0, len(prompt) - 1:]
    return log_probs.gather(-1, tokens[0, len(prompt):, None]).sum().item()


def needle_probe(model: MoEDiffTransformer, tokenizer: Tokenizer, context_tokens: int, trials: int = 4,
                 candidates: int = 4, seed: int = 0) -> dict[str, Any]:
    """Per depth: mean log-likelihood of the planted value, and the share of trials in which it beats
    `candidates` distractor values from the same context (chance: 1 / (candidates + 1))."""
    model.eval()
    rng = random.Random(seed)
    line_tokens = len(tokenizer.encode(_line("bal", "1234")))
    n_lines = max(2, min(context_tokens, model.cfg.max_seq_len) // line_tokens - 3)  # room for needle and query
    results = []
    for depth in DEPTHS:
        scores, wins = [], 0
        for _ in range(trials):
            context, _, value, others = haystack(rng, n_lines, depth)
            true_score = value_log_likelihood(model, tokenizer, context, value)
            rivals = [value_log_likelihood(model, tokenizer, context, other)
                      for other in rng.sample(others, min(candidates, len(others)))]
            scores.append(true_score)
            wins += true_score > max(rivals)
        results.append({"depth": depth, "value_log_likelihood": sum(scores) / trials, "accuracy": wins / trials})
    return {"context_lines": n_lines, "chance": 1 / (candidates + 1), "depths": results}


def check_needle_lengths(lengths: list[int], max_seq_len: int) -> None:
    """Refuse a context length the model cannot read whole (rather than cut it)."""
    for length in lengths:
        if not SHORTEST_CONTEXT <= length <= max_seq_len:
            raise ConfigError(f"--needle-lengths {length} is not allowed: context lengths from {SHORTEST_CONTEXT} to "
                              f"the model's max_seq_len ({max_seq_len}) tokens")


def needle_probes(model: MoEDiffTransformer, tokenizer: Tokenizer, lengths: list[int], trials: int = 4
                  ) -> dict[str, dict[str, Any]]:
    """needle_probe at each context length in tokens, keyed by the length."""
    check_needle_lengths(lengths, model.cfg.max_seq_len)
    return {str(length): needle_probe(model, tokenizer, length, trials=trials) for length in lengths}
