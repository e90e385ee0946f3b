"""`moe-diff generate`: a prompt's continuation from a checkpoint, printed as it is sampled, and optionally the
routing of prompt and continuation as a trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from moe_diff.checkpoint.open import StoredModel
from moe_diff.data import Tokenizer
from moe_diff.errors import UsageError, literal
from moe_diff.inference.generation import check_length, stream
from moe_diff.routing.collect import trace_sequences
from moe_diff.routing.trace import save_trace


def complete(stored: StoredModel, prompt: str, console: Console, tokenizer: str | None = None,
             trace: Path | None = None, *, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
    """Print `prompt` (dimmed) and its continuation as the tokens arrive; return prompt and continuation [1, T].
    `tokenizer` defaults to the checkpoint's (StoredModel.tokenizer); `sampling` takes stream()'s other arguments
    (temperature, top_k, ...). Every argument is checked before anything is printed."""
    if not prompt:
        raise UsageError("--prompt must not be empty")
    model = stored.model
    text_tokenizer = stored.tokenizer(tokenizer)
    prompt_ids, shown_prompt = encode_prompt(prompt, text_tokenizer)
    check_length(model.cfg, prompt_ids.shape[1], max_new_tokens, "--max-new-tokens")  # stream's check, in our words
    steps = stream(model, prompt_ids, max_new_tokens, **sampling)
    console.print(Text(shown_prompt, style="dim"), end="", soft_wrap=True)
    new_ids, shown = [], ""
    try:
        for step in steps:
            new_ids.append(int(step[0]))
            text = text_tokenizer.decode(new_ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                console.out(text[len(shown):], end="", highlight=False)
                shown = text
    finally:  # the rest, and the end of the line (before an error's message, too)
        console.out(text_tokenizer.decode(new_ids)[len(shown):], highlight=False)
    tokens = torch.cat([prompt_ids, torch.tensor([new_ids], dtype=torch.long)], 1)
    if trace is not None:
        header = {"source": f"generate {stored.path}", "tokenizer": text_tokenizer.name, "model": vars(model.cfg)}
        console.print(f"wrote {literal(save_trace(trace_sequences(model, tokens, header), trace))}")
    return tokens


def encode_prompt(prompt: str, tokenizer: Tokenizer) -> tuple[torch.Tensor, str]:
    """The prompt's ids [1, T] and the text to print for it. A command-line argument that is not valid UTF-8
    arrives with its undecodable bytes as surrogates (Python's surrogateescape): the byte tokenizer takes the
    bytes as they were given, which print as replacement characters; a tokenizer.json needs text."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        if tokenizer.name != "byte":
            raise UsageError(f"--prompt is not valid UTF-8, and data.tokenizer={tokenizer.name!r} reads text: "
                             "convert the prompt to UTF-8, or use a byte-level model (--tokenizer byte)") from None
        given = prompt.encode("utf-8", "surrogateescape")
        return torch.tensor([list(given)], dtype=torch.long), given.decode("utf-8", "replace")
    return torch.as_tensor(tokenizer.encode(prompt), dtype=torch.long)[None], prompt
