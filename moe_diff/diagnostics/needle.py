"""A needle-retrieval probe: a key planted at several depths of a long context of distractor keys,
scored by how likely the model finds the planted value against other values it has seen."""

from __future__ import annotations

import functools
import math
import random
from typing import Any

import torch
import torch.nn.functional as F

from moe_diff.config import ConfigError
from moe_diff.data import Tokenizer
from moe_diff.model import MoEDiffTransformer

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
KEYS = [f"{a}{b}{c}" for a in "bdfgkmps" for b in "aeiou" for c in "lnrtx"]  # 200 three-letter keys
SYLLABLES = [f"{a}{b}" for a in "bdfgkmps" for b in "aeiou"]  # put before a key when 200 are too few
VALUE = "1234"  # values are four digits


def _line(key: str, value: str) -> str:
    return f"key {key}: value {value}\n"


def key_count(syllables: int) -> int:
    """How many distinct keys carry `syllables` syllables before their three letters."""
    return len(KEYS) * len(SYLLABLES) ** syllables


def key_syllables(count: int) -> int:
    """How many syllables each key carries before its three letters so that `count` keys are distinct."""
    syllables = 0
    while key_count(syllables) < count:
        syllables += 1
    return syllables


def key(index: int, syllables: int) -> str:
    """The key numbered `index` among those with `syllables` syllables before their three letters."""
    index, last = divmod(index, len(KEYS))
    prefix = ""
    for _ in range(syllables):
        index, syllable = divmod(index, len(SYLLABLES))
        prefix += SYLLABLES[syllable]
    return prefix + KEYS[last]


def haystack(rng: random.Random, n_lines: int, depth: float) -> tuple[str, str, str, list[str]]:
    """(context with the needle at `depth`, the needle's key, its value, distractor values)."""
    syllables = key_syllables(n_lines + 1)
    keys = [key(i, syllables) for i in rng.sample(range(key_count(syllables)), n_lines + 1)]
    values = [str(rng.randrange(1000, 10000)) for _ in range(n_lines + 1)]
    lines = [_line(k, v) for k, v in zip(keys[1:], values[1:], strict=True)]
    lines.insert(round(depth * n_lines), _line(keys[0], values[0]))
    return "".join(lines) + f"key {keys[0]}: value ", keys[0], values[0], values[1:]


def read_tokens(tokenizer: Tokenizer, context: str, values: list[str]) -> int:
    """Tokens the model reads to score the longest of `values` after `context` (all but the value's last)."""
    return len(tokenizer.encode(context)) + max(len(tokenizer.encode(value)) for value in values) - 1


def _estimate(tokenizer: Tokenizer, n_lines: int, syllables: int) -> int:
    """Tokens read for `n_lines` distractor lines with keys of `syllables` syllables (exact for bytes)."""
    needle = key(0, syllables)
    line = len(tokenizer.encode(_line(needle, VALUE)))
    return (n_lines + 1) * line + read_tokens(tokenizer, f"key {needle}: value ", [VALUE])


def context_lines(length: int, tokenizer: Tokenizer) -> int:
    """The most distractor lines (at least 2) whose haystack the model reads in `length` tokens or fewer, keys of
    whatever width that many lines need."""
    best, syllables = 2, 0
    while syllables == 0 or key_count(syllables - 1) < length:  # fewer lines than tokens
        fixed = _estimate(tokenizer, 0, syllables)
        lines = min((length - fixed) // (_estimate(tokenizer, 1, syllables) - fixed), key_count(syllables) - 1)
        if key_syllables(lines + 1) == syllables:
            best = max(best, lines)
        syllables += 1
    return best


@functools.cache
def shortest_context(tokenizer: Tokenizer) -> int:
    """The most tokens a haystack of two distractor lines around the needle may read, whichever keys and values it
    draws (the key's and the value's most tokens added: exact for bytes, an upper bound for a tokenizer that splits
    words apart before merging): no shorter context is probed."""
    def tokens(text: str) -> int:
        return len(tokenizer.encode(text))

    value = max(tokens(str(number)) for number in range(1000, 10000))
    line = max(tokens(_line(key, VALUE)) for key in KEYS) - tokens(VALUE) + value
    return 3 * line + max(tokens(f"key {key}: value ") for key in KEYS) + value - 1


def fitted_haystack(rng: random.Random, tokenizer: Tokenizer, length: int, depth: float
                    ) -> tuple[str, str, str, list[str]]:
    """haystack with as many lines as `length` tokens hold, drawn again with fewer lines while a tokenizer whose
    tokens span several characters makes it read more."""
    n_lines = context_lines(length, tokenizer)
    while True:
        drawn = haystack(rng, n_lines, depth)
        context, _, value, others = drawn
        over = read_tokens(tokenizer, context, [value, *others]) - length
        if over <= 0:
            return drawn
        if n_lines == 2:
            raise ConfigError(f"--needle-lengths {length} is too short for this tokenizer: a haystack of two lines "
                              f"reads {length + over} tokens")
        n_lines = max(2, n_lines - math.ceil(over * n_lines / (length + over)))


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
    `candidates` distractor values from the same context (chance: 1 / (candidates + 1)); every context is read in
    `context_tokens` tokens or fewer, in context_lines distractor lines (with a subword tokenizer, at most)."""
    check_needle_lengths([context_tokens], model.cfg.max_seq_len, tokenizer)
    model.eval()
    rng = random.Random(seed)
    results = []
    for depth in DEPTHS:
        scores, wins = [], 0
        for _ in range(trials):
            context, _, value, others = fitted_haystack(rng, tokenizer, context_tokens, depth)
            true_score = value_log_likelihood(model, tokenizer, context, value)
            rivals = [value_log_likelihood(model, tokenizer, context, other)
                      for other in rng.sample(others, min(candidates, len(others)))]
            scores.append(true_score)
            wins += true_score > max(rivals)
        results.append({"depth": depth, "value_log_likelihood": sum(scores) / trials, "accuracy": wins / trials})
    return {"context_lines": context_lines(context_tokens, tokenizer), "chance": 1 / (candidates + 1),
            "depths": results}


def check_needle_lengths(lengths: list[int], max_seq_len: int, tokenizer: Tokenizer) -> None:
    """Refuse a context length the model cannot read whole (rather than cut it) or too short for a haystack."""
    shortest = shortest_context(tokenizer)
    for length in lengths:
        if not shortest <= length <= max_seq_len:
            allowed = (f"context lengths from {shortest} (two lines around the needle) to the model's max_seq_len "
                       f"({max_seq_len}) tokens" if shortest <= max_seq_len else
                       f"the model's max_seq_len ({max_seq_len}) holds no haystack (at least {shortest} tokens)")
            raise ConfigError(f"--needle-lengths {length} is not allowed: {allowed}")


def needle_probes(model: MoEDiffTransformer, tokenizer: Tokenizer, lengths: list[int], trials: int = 4
                  ) -> dict[str, dict[str, Any]]:
    """needle_probe at each context length in tokens, keyed by the length."""
    check_needle_lengths(lengths, model.cfg.max_seq_len, tokenizer)
    return {str(length): needle_probe(model, tokenizer, length, trials=trials) for length in lengths}
