"""`moe-diff generate`: a prompt's continuation from a checkpoint, printed as it is sampled, and optionally the
routing of prompt and continuation as a trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from moe_diff.checkpoint.open import StoredModel
from moe_diff.config import DataConfig
from moe_diff.data import check_vocabulary, load_tokenizer
from moe_diff.errors import UsageError
from moe_diff.inference.generation import stream
from moe_diff.routing.collect import trace_sequences
from moe_diff.routing.trace import save_trace


def complete(stored: StoredModel, prompt: str, console: Console, tokenizer: str | None = None,
             trace: Path | None = None, **sampling: Any) -> torch.Tensor:
    """Print `prompt` (dimmed) and its continuation as the tokens arrive; return prompt and continuation [1, T].
    `tokenizer` defaults to the run's; `sampling` takes stream()'s arguments (max_new_tokens, temperature, ...)."""
    if not prompt:
        raise UsageError("--prompt must not be empty")
    model = stored.model
    text_tokenizer = load_tokenizer(DataConfig(tokenizer=tokenizer) if tokenizer else stored.data or DataConfig())
    check_vocabulary(model.cfg.vocab_size, text_tokenizer)
    prompt_ids = torch.as_tensor(text_tokenizer.encode(prompt), dtype=torch.long)[None]
    console.print(Text(prompt, style="dim"), end="")
    new_ids, shown = [], ""
    for step in stream(model, prompt_ids, **sampling):
        new_ids.append(int(step[0]))
        text = text_tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            console.out(text[len(shown):], end="", highlight=False)
            shown = text
    console.out(text_tokenizer.decode(new_ids)[len(shown):], highlight=False)
    tokens = torch.cat([prompt_ids, torch.tensor([new_ids], dtype=torch.long)], 1)
    if trace is not None:
        header = {"source": f"generate {stored.path}", "tokenizer": text_tokenizer.name, "model": vars(model.cfg)}
        console.print(f"wrote {save_trace(trace_sequences(model, tokens, header), trace)}")
    return tokens
