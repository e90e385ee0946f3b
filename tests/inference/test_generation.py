"""Generation: the KV cache changes nothing but speed, batching changes nothing, and the samplers behave."""

import pytest
import torch

from moe_diff.config import ModelConfig
from moe_diff.inference import generation as generate_module
from moe_diff.inference.generation import generate, stream
from moe_diff.model import KVCache, MoEDiffTransformer

MODES = ["standard", "diff", "diff_v2"]


def decisive_model(attention: str, window: int | None, **overrides) -> MoEDiffTransformer:
    """A float64 random model with large weights, so greedy choices are never near-ties."""
    torch.manual_seed(0)
    values = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, n_experts=4, top_k=2,
                  sliding_window=window, max_seq_len=64, attention=attention, rope_theta=100.0)
    model = MoEDiffTransformer(ModelConfig(**(values | overrides))).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.1 if "lambda_q" in name or "lambda_k" in name else 0.4)
    return model


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("prompt_length", [3, 9])
def test_cache_equals_recomputation(attention: str, window: int | None, prompt_length: int) -> None:
    """Prompts shorter and longer than the window, and generations that run past it."""
    model = decisive_model(attention, window)
    tokens = prompt(prompt_length)[None].repeat(2, 1)
    cached = generate(model, tokens, 14, use_cache=True)
    assert torch.equal(cached, generate(model, tokens, 14, use_cache=False))
    assert len(set(cached[0, prompt_length:].tolist())) > 2  # not a degenerate repeat


@pytest.mark.parametrize("attention", MODES)
def test_batched_prompts_of_different_lengths_equal_one_by_one(attention: str) -> None:
    model = decisive_model(attention, window=5)
    prompts = [prompt(n, seed=n) for n in (2, 7, 4)]
    for use_cache in (True, False):
        batched = generate(model, prompts, 9, use_cache=use_cache)
        for row, single in enumerate(prompts):
            alone = generate(model, single[None], 9, use_cache=use_cache)[0]
            assert torch.equal(batched[row, 7 - len(single):], alone), (row, use_cache)


def test_chunked_prefill_of_a_prompt_longer_than_window_and_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    model = decisive_model("diff", window=4)
    tokens = prompt(23)[None]
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 6)
    assert torch.equal(generate(model, tokens, 8), generate(model, tokens, 8, use_cache=False))


def test_a_batch_prefilled_in_chunks_of_a_token_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a batch's prefill forward takes at most CPU_PREFILL_TOKENS: 3 padded prompts in chunks of 3
    tokens per row generate what full recomputation does, with one forward per chunk."""
    model = decisive_model("diff_v2", window=4)
    prompts = [prompt(n, seed=n) for n in (11, 5, 8)]
    monkeypatch.setattr(generate_module, "CPU_PREFILL_TOKENS", 10)
    forwards = []
    chunked = torch.stack(list(stream(model, prompts, 6, on_forward=forwards.append)), 1)
    assert torch.equal(chunked, generate(model, prompts, 6, use_cache=False)[:, -6:])
    assert [out.logits.shape[1] for out in forwards[:4]] == [3, 3, 3, 2]


def test_a_cache_without_padding_gives_one_mask_row_equal_to_the_padded_rule() -> None:
    """Without padding the cache's mask is one row expanded over the batch (stride 0, which SDPA takes once), equal
    to the per-row rule with no key hidden, for a chunk that overruns the window and for one-token steps."""
    caches = [KVCache(3, 4, 1, 2, 4, torch.zeros(3, dtype=torch.long), padded, torch.float32, torch.device("cpu"))
              for padded in (False, True)]
    for n_new in (6, 1, 1):
        shared, per_row = (cache.mask(n_new).explicit for cache in caches)
        assert shared.stride(0) == 0 and per_row.stride(0) != 0 and torch.equal(shared, per_row)
        for cache in caches:
            cache.update(torch.zeros(3, n_new, 1, 2), torch.zeros(3, n_new, 1, 2))


@pytest.mark.parametrize("rows", [2, 3])
def test_compiled_decode_steps_generate_the_same_tokens(rows: int) -> None:
    """Static-shape steps over the whole rolling buffer: one graph, same greedy tokens. Two rows gather their
    experts' weights (4 (token, slot) pairs for 4 experts), also with one mask row for the batch; three sort their
    pairs by expert in one operator."""
    model = decisive_model("diff", window=4).float()
    prompts = [prompt(2 + 4 * row, seed=row) for row in range(rows)]
    outputs = []
    compiled = torch.stack(list(stream(model, prompts, 9, compile=True, on_forward=outputs.append)), 1)
    assert torch.equal(compiled, generate(model, prompts, 9)[:, -9:])
    assert len(outputs) == 9 and all(out.logits.shape == (rows, 1, 50) for out in outputs[1:])  # prefill, steps
    if rows == 2:  # another graph to compile: once
        unpadded = torch.stack([prompt(5, seed=row) for row in range(rows)])  # one mask row for the batch
        assert torch.equal(generate(model, unpadded, 6, compile=True), generate(model, unpadded, 6))


def test_rolling_cache_memory_is_flat_in_generated_length() -> None:
    model = decisive_model("diff_v2", window=4, max_seq_len=16)
    sizes = []
    original = model.setup_caches

    def record(batch_size, key_start=None, max_length=None):
        original(batch_size, key_start, max_length)
        sizes.append([block.attention.kv_cache.k.shape for block in model.layers])

    model.setup_caches = record
    out = generate(model, prompt(3)[None], 40)  # far past max_seq_len: the window keeps it exact and bounded
    assert out.shape == (1, 43) and sizes == [[torch.Size([1, 4, 2, 8])] * 2]
    assert all(block.attention.kv_cache is None for block in model.layers)  # caches are released


def test_a_windowed_model_generates_past_max_seq_len_from_a_prompt_longer_than_it() -> None:
    """Prefill chunks stay within max_seq_len; rotary angles are computed for any position and no query sees more
    than the window, so the rolling cache equals recomputing the last max_seq_len tokens (2 layers of a window of
    4 reach back 6 tokens)."""
    model = decisive_model("diff", window=4, max_seq_len=16)
    tokens = prompt(23)[None]
    assert torch.equal(generate(model, tokens, 30), generate(model, tokens, 30, use_cache=False))


@pytest.mark.parametrize(("length", "new", "needle"), [
    (60, 5, "the prompt (60 tokens) and max_new_tokens 5 make 65 positions, more than the model's max_seq_len (64) "
            "without a sliding window: shorten the prompt to at most 59 tokens or use max_new_tokens 4 or fewer"),
    (70, 1, "the prompt (70 tokens) and max_new_tokens 1 make 71 positions, more than the model's max_seq_len (64) "
            "without a sliding window: shorten the prompt to at most 63 tokens"),
])
def test_positions_past_max_seq_len_without_a_window_are_refused_at_the_call(length: int, new: int,
                                                                            needle: str) -> None:
    model = decisive_model("standard", window=None)
    for use_cache in (True, False):
        with pytest.raises(ValueError) as refused:
            stream(model, prompt(length)[None], new, use_cache=use_cache)  # before the first step is asked for
        assert str(refused.value) == needle
    assert generate(model, prompt(60)[None], 4).shape == (1, 64)


def test_sampling_options() -> None:
    model = decisive_model("standard", window=None).float()
    tokens = prompt(4)[None]
    greedy = generate(model, tokens, 10)
    assert torch.equal(generate(model, tokens, 10, temperature=1.0, top_k=1, seed=3), greedy)
    first = generate(model, tokens, 10, temperature=1.5, top_p=0.9, seed=3)
    assert torch.equal(generate(model, tokens, 10, temperature=1.5, top_p=0.9, seed=3), first)
    stop = int(greedy[0, 6])
    stopped = generate(model, tokens, 10, stop_tokens=[stop])
    assert stopped.shape[1] <= greedy.shape[1] and stopped[0, -1] == stop
    no_repeats = generate(model, tokens, 10, repetition_penalty=1e9)
    generated = no_repeats[0, 4:].tolist()
    assert len(set(generated)) == len(generated)  # every seen token was pushed to the bottom
    streamed = [step for step in stream(model, tokens, 10)]
    assert torch.equal(torch.stack(streamed, 1), greedy[:, 4:])


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"temperature": -1.0}, "temperature >= 0"), ({"top_p": 0.0}, "0 < top_p <= 1"),
    ({"top_k": 0}, "top_k >= 1"), ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
])
def test_bad_sampling_arguments(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", "\\(")):
        generate(decisive_model("standard", None), prompt(3)[None], 2, **kwargs)
    with pytest.raises(ValueError, match=needle.replace("(", "\\(")):
        stream(decisive_model("standard", None), prompt(3)[None], 2, **kwargs)  # at the call, not the first step
    with pytest.raises(ValueError, match="non-empty"):
        generate(decisive_model("standard", None), [], 2)


def test_greedy_tokens_match_transformers_mixtral_generate() -> None:
    transformers = pytest.importorskip("transformers")
    from moe_diff.checkpoint.mixtral import from_hf_mixtral

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, attn_implementation="eager", pad_token_id=0, eos_token_id=None)
    hf = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    tokens = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(tokens, max_new_tokens=15, do_sample=False, attention_mask=torch.ones_like(tokens))
    ours = from_hf_mixtral(hf)
    assert torch.equal(generate(ours, tokens, 15), expected)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("attention", MODES)
def test_fused_attention_equals_the_reference_through_the_whole_model(attention: str, backend: str) -> None:
    reference, fused = decisive_model(attention, window=4), decisive_model(attention, window=4, attn_backend=backend)
    tokens = prompt(11)[None].repeat(2, 1)
    documents = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    with torch.no_grad():  # FlexAttention has no backward on CPU, and refuses inputs that need one
        torch.testing.assert_close(fused(tokens, document_ids=documents).logits,
                                   reference(tokens, document_ids=documents).logits, rtol=1e-10, atol=1e-10)
    prompts = [prompt(n, seed=n) for n in (2, 7)]
    assert torch.equal(generate(fused, prompts, 9), generate(reference, prompts, 9))
