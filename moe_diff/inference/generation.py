"""Generation: prefill then decode with per-layer KV caches, batched prompts, and the usual samplers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from moe_diff.config import ModelConfig
from moe_diff.errors import UsageError
from moe_diff.kernels.moe_decode import moe_experts_gemv
from moe_diff.kernels.moe_experts import moe_experts_every, moe_experts_gathered, moe_experts_sorted_op
from moe_diff.kernels.triton_compat import HAVE_TRITON
from moe_diff.model import ModelOutput, MoEDiffTransformer

PREFILL_CHUNK = 512  # the most prompt tokens of a row one prefill forward takes; bounds the attention scores held
CPU_PREFILL_TOKENS = 4096  # on the CPU, the most prompt tokens of the whole batch one prefill forward takes


def left_pad(prompts: torch.Tensor | Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded [B, T] tensor and each row's number of padding tokens [B]."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise UsageError(f"prompt tokens must be [batch, length >= 1], got shape {list(prompts.shape)}")
        return prompts, torch.zeros(prompts.shape[0], dtype=torch.long, device=prompts.device)
    if not prompts or any(p.dim() != 1 or len(p) == 0 for p in prompts):
        raise UsageError("prompts must be a non-empty list of non-empty 1-D token tensors")
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=prompts[0].device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = prompt
    return tokens, torch.tensor([longest - len(p) for p in prompts], device=tokens.device)


def position_limit(cfg: ModelConfig) -> int | None:
    """How many positions a prompt and its continuation may take together: max_seq_len, or any number (None) with a
    sliding window no wider than max_seq_len."""
    window = cfg.sliding_window
    return None if window is not None and window <= cfg.max_seq_len else cfg.max_seq_len


def check_length(cfg: ModelConfig, prompt_length: int, max_new_tokens: int, name: str = "max_new_tokens") -> None:
    """UsageError unless the model has a position for every token of the prompt and its continuation: at most
    max_seq_len of them, or any number with a sliding window no wider than max_seq_len (the KV cache rolls, no
    query sees further back than the window, and rotary angles are computed for any position). `name` is what
    the caller calls max_new_tokens."""
    total, limit, window = prompt_length + max_new_tokens, cfg.max_seq_len, cfg.sliding_window
    if position_limit(cfg) is None or total <= limit:
        return
    ways = []
    if max_new_tokens < limit:
        ways.append(f"shorten the prompt to at most {limit - max_new_tokens} tokens")
    if prompt_length < limit:
        ways.append(f"use {name} {limit - prompt_length} or fewer")
    beyond = "without a sliding window" if window is None else f"with a sliding window ({window}) wider than that"
    raise UsageError(f"the prompt ({prompt_length} tokens) and {name} {max_new_tokens} make {total} positions, more "
                     f"than the model's max_seq_len ({limit}) {beyond}: "
                     + (" or ".join(ways) or f"keep the prompt and {name} within {limit} together"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def penalise_repeats(logits: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: divide positive (multiply negative) logits of tokens already in the row."""
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, tokens, real)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def prefill_chunk(cfg: ModelConfig, batch: int, device_type: str) -> int:
    """Prompt tokens of each row one prefill forward takes: PREFILL_CHUNK, at most max_seq_len, and on the CPU at
    most CPU_PREFILL_TOKENS over the batch (64 prompts of 512 tokens at bench-13m's shapes prefilled in 0.6-0.8x
    the time in chunks of 64 as in chunks of 512: activations of a few MB stay in cache and in the allocator's
    reach)."""
    chunk = min(PREFILL_CHUNK, cfg.max_seq_len)
    return max(1, min(chunk, CPU_PREFILL_TOKENS // max(batch, 1))) if device_type == "cpu" else chunk


def decode_expert_op(device_type: str, n_pairs: int, n_experts: int,
                     triton_available: bool = HAVE_TRITON) -> Callable[..., torch.Tensor]:
    """The experts of a compiled decode step, whose shapes are static. A step with no more (token, slot) pairs than
    experts reads just the chosen experts: on a GPU with Triton through two launches of matrix-vector products
    that read each pair's expert rows once (moe_decode), elsewhere by gathering the chosen experts' weights
    (gpt-fast's way, fused into the matmul by inductor on the CPU). A larger step runs every expert over its
    tokens on CUDA (CUDA graphs cannot capture the host synchronisation of a loop over experts) and elsewhere the
    pairs sorted by expert, one SwiGLU per chosen expert, as one opaque operator."""
    if n_pairs <= n_experts:
        return moe_experts_gemv if device_type == "cuda" and triton_available else moe_experts_gathered
    return moe_experts_every if device_type == "cuda" else moe_experts_sorted_op


def decode_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The experts of a compiled decode step, by decode_expert_op."""
    compute = decode_expert_op(x.device.type, expert_ids.numel(), w1.shape[0])
    return compute(x, expert_ids, weights, w1, w2, w3)


@contextlib.contextmanager
def experts_computed_by(model: MoEDiffTransformer, compute: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Every layer's experts computed by `compute` inside the block, by their configured backend again after."""
    experts = [block.moe.experts for block in model.layers]
    configured = [module.compute for module in experts]
    for module in experts:
        module.compute = compute
    try:
        yield
    finally:
        for module, own in zip(experts, configured, strict=True):
            module.compute = own


def compiled_decode_step(model: MoEDiffTransformer) -> Callable[..., ModelOutput]:
    """The model compiled for one-token steps against its KV caches: static shapes, one graph (CUDA graphs
    on GPU), its experts computed by decode_experts; it compiles again for each new batch size or cache length, and
    for a batch with left padding after one without (or the reverse)."""
    mode = "reduce-overhead" if model.tok_embeddings.weight.is_cuda else None
    compiled = torch.compile(model, dynamic=False, fullgraph=True, mode=mode)

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> ModelOutput:
        with experts_computed_by(model, decode_experts):
            return compiled(tokens, positions)

    return step


class Decoder:
    """Next-token logits for a growing batch of sequences, with or without KV caches."""

    def __init__(self, model: MoEDiffTransformer, pad: torch.Tensor, use_cache: bool, max_length: int,
                 step: Callable[..., ModelOutput] | None = None,
                 on_forward: Callable[[ModelOutput], None] | None = None):
        self.model, self.pad, self.use_cache, self.on_forward = model, pad, use_cache, on_forward
        self.step = model if step is None else step  # runs the one-token steps against the caches
        self.padded = bool((pad > 0).any())
        if use_cache:
            model.setup_caches(len(pad), key_start=pad, max_length=max_length)

    def _inputs(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions counted from each row's first real token; without a cache, pads form document 0."""
        index = torch.arange(start, stop, device=self.pad.device)[None]
        positions = (index - self.pad[:, None]).clamp_min(0)
        documents = (index >= self.pad[:, None]).long() if self.padded and not self.use_cache else None
        return positions, documents

    def logits(self, tokens: torch.Tensor, n_new: int) -> torch.Tensor:
        """Logits [B, V] after `tokens` [B, L], whose last n_new tokens the model has not seen yet."""
        length = tokens.shape[1]
        if not self.use_cache:
            start = max(0, length - self.model.cfg.max_seq_len)  # the longest context one forward takes
            positions, documents = self._inputs(start, length)
            return self._seen(self.model(tokens[:, start:], positions, documents))
        if n_new == 1:  # fresh dense strides, so a compiled step sees the same input layout every time
            return self._seen(self.step(tokens[:, -1:].clone(memory_format=torch.contiguous_format),
                                        self._inputs(length - 1, length)[0]))
        chunk = prefill_chunk(self.model.cfg, len(tokens), tokens.device.type)
        for start in range(length - n_new, length, chunk):
            stop = min(start + chunk, length)
            logits = self._seen(self.model(tokens[:, start:stop], self._inputs(start, stop)[0]))
        return logits

    def _seen(self, out: ModelOutput) -> torch.Tensor:
        """The last position's logits [B, V], after showing the whole output to `on_forward`."""
        if self.on_forward is not None:
            self.on_forward(out)
        return out.logits[:, -1]

    def close(self) -> None:
        if self.use_cache:
            self.model.clear_caches()


def stream(model: MoEDiffTransformer, prompts: torch.Tensor | Sequence[torch.Tensor], max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           repetition_penalty: float = 1.0, stop_tokens: Sequence[int] = (), seed: int | None = None,
           use_cache: bool = True, compile: bool = False,
           on_forward: Callable[[ModelOutput], None] | None = None) -> Iterator[torch.Tensor]:
    """An iterator of each step's new tokens [B], produced as they are asked for (see `generate` for the
    arguments); the arguments are checked here, before the first step.

    on_forward, if given, sees every forward's ModelOutput (prefill chunks, then one per step), e.g. to
    record which experts each step chose.
    """
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise UsageError(f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got temperature="
                         f"{temperature}, top_k={top_k}, top_p={top_p}")
    if repetition_penalty <= 0:
        raise UsageError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if compile and not use_cache:
        raise UsageError("compile=True compiles the one-token step against the KV cache; it needs use_cache=True")
    tokens, pad = left_pad(prompts)
    check_length(model.cfg, tokens.shape[1], max_new_tokens)
    return _steps(model, tokens, pad, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens,
                  seed, use_cache, compile, on_forward)


@torch.no_grad()
def _steps(model: MoEDiffTransformer, tokens: torch.Tensor, pad: torch.Tensor, max_new_tokens: int,
           temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float,
           stop_tokens: Sequence[int], seed: int | None, use_cache: bool, compile: bool,
           on_forward: Callable[[ModelOutput], None] | None) -> Iterator[torch.Tensor]:
    """stream's steps, from left-padded prompt tokens [B, T] and each row's padding [B]."""
    generator = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
    real = torch.arange(tokens.shape[1], device=tokens.device)[None] >= pad[:, None]
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=tokens.device)
    finished = torch.zeros(len(pad), dtype=torch.bool, device=tokens.device)
    compiled_step = compiled_decode_step(model) if compile else None
    decoder = Decoder(model, pad, use_cache, tokens.shape[1] + max_new_tokens, compiled_step, on_forward)
    n_new = tokens.shape[1]
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = decoder.logits(tokens, n_new)
            if repetition_penalty != 1.0:
                logits = penalise_repeats(logits, tokens, real, repetition_penalty)
                real = torch.cat([real, torch.ones_like(real[:, :1])], 1)
            step = sample_next(logits, temperature, top_k, top_p, generator)
            if len(stops):
                step = torch.where(finished, tokens[:, -1], step)  # a finished row repeats its stop token
                finished |= torch.isin(step, stops)
            tokens, n_new = torch.cat([tokens, step[:, None]], 1), 1
            yield step
            if len(stops) and bool(finished.all()):
                return
    finally:
        decoder.close()
        model.train(was_training)


def generate(model: MoEDiffTransformer, prompts: torch.Tensor | Sequence[torch.Tensor], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             use_cache: bool = True, repetition_penalty: float = 1.0, stop_tokens: Sequence[int] = (),
             seed: int | None = None, compile: bool = False) -> torch.Tensor:
    """The prompts followed by up to `max_new_tokens` new tokens: [B, T + new].

    prompts: a [B, T] tensor, or a list of 1-D tensors of different lengths (left-padded with 0;
    positions count from each prompt's first token and padding is never attended to).
    temperature 0 is greedy; top_k and top_p filter before sampling; `seed` makes sampling
    repeatable. Generation stops early once every row has produced one of `stop_tokens`; a
    finished row repeats its stop token. With a sliding window (no wider than max_seq_len) the KV
    cache is a rolling buffer of `sliding_window` positions, so memory stays flat however long the
    generation; without one it holds the prompt and the new tokens, which may not exceed
    max_seq_len (a UsageError says so before any step). use_cache=False recomputes the whole
    context each step.
    compile=True runs the decode steps through torch.compile (static shapes; the first call per batch
    size and length compiles, later ones reuse it).
    """
    tokens, _ = left_pad(prompts)
    new = list(stream(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens,
                      seed, use_cache, compile))
    return torch.cat([tokens, torch.stack(new, 1)], 1) if new else tokens
