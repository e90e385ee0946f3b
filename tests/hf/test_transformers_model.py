"""The transformers face of a moe-diff model (moe_diff.hf) against the project's own model: logits with and without
left padding, generation, the transformers cache, the loss."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

import moe_diff
from moe_diff.config import ModelConfig
from moe_diff.hf.configuration import MoeDiffConfig
from moe_diff.hf.modeling import MoeDiffForCausalLM

MODES = ["standard", "diff", "diff_v2"]
WINDOW = 6  # shorter than the prompts and the generations below


def hf_model(mode: str, window: int | None = WINDOW, tied: bool = False, seed: int = 0,
             max_seq_len: int = 64) -> MoeDiffForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=32,
                      n_experts=4, sliding_window=window, attention=mode, tie_embeddings=tied, max_seq_len=max_seq_len)
    return MoeDiffForCausalLM(MoeDiffConfig.from_model_config(cfg, eos_token_id=256, pad_token_id=256)).eval()


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of prompts padded on the left with the pad id."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), 256)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):], mask[row, longest - len(prompt):] = prompt, 1
    return ids, mask


PROMPTS = [torch.arange(10, 22), torch.arange(40, 47)]  # 12 and 7 tokens: row 1 has 5 pads


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_logits_equal_the_project_model(mode: str, window: int | None, tied: bool) -> None:
    hf = hf_model(mode, window, tied)
    assert hf.model.output.weight is hf.model.tok_embeddings.weight if tied else True
    ids, mask = left_padded(PROMPTS)
    torch.testing.assert_close(hf(ids, use_cache=False).logits, hf.model(ids).logits, rtol=1e-5, atol=1e-6)
    padded = hf(ids, attention_mask=mask, use_cache=False).logits
    cached = hf(ids, attention_mask=mask, use_cache=True).logits
    for row, prompt in enumerate(PROMPTS):
        alone = hf.model(prompt[None]).logits[0]
        torch.testing.assert_close(padded[row, -len(prompt):], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached[row, -len(prompt):], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_greedy_generate_equals_moe_diff_generate(mode: str, window: int | None) -> None:
    hf = hf_model(mode, window)
    ids, mask = left_padded(PROMPTS)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    ours = moe_diff.generate(hf.model, PROMPTS, max_new_tokens=12)
    assert torch.equal(theirs[:, ids.shape[1]:], ours[:, ids.shape[1]:])


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_beam_search_and_sampling_agree_with_and_without_the_cache(mode: str) -> None:
    """Beam search reorders the transformers cache between steps: with it and without it (every step recomputed)
    the beams are the same; seeded sampling likewise."""
    hf = hf_model(mode)
    ids, mask = left_padded(PROMPTS)
    beams = {use_cache: hf.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False,
                                    num_return_sequences=2, use_cache=use_cache) for use_cache in (True, False)}
    assert beams[True].shape == (4, ids.shape[1] + 10) and torch.equal(beams[True], beams[False])
    samples = {}
    for use_cache in (True, False):
        torch.manual_seed(1)
        samples[use_cache] = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20,
                                         use_cache=use_cache)
    assert torch.equal(samples[True], samples[False])


@pytest.mark.parametrize("window", [None, WINDOW])
@torch.no_grad()
def test_past_key_values_is_a_transformers_cache_and_steps_match_one_forward(window: int | None) -> None:
    hf = hf_model("diff", window)
    ids, mask = left_padded(PROMPTS)
    whole = hf(ids, attention_mask=mask, use_cache=False).logits
    out = hf(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    assert isinstance(out.past_key_values, DynamicCache)
    sliding = [isinstance(layer, DynamicSlidingWindowLayer) for layer in out.past_key_values.layers]
    assert sliding == [window is not None] * 2
    steps = [out.logits]
    for stop in range(6, ids.shape[1] + 1):
        out = hf(ids[:, stop - 1:stop], attention_mask=mask[:, :stop], past_key_values=out.past_key_values)
        steps.append(out.logits)
    for row, prompt in enumerate(PROMPTS):
        real = slice(ids.shape[1] - len(prompt), None)
        torch.testing.assert_close(torch.cat(steps, 1)[row, real], whole[row, real], rtol=1e-5, atol=1e-6)


def test_loss_is_the_training_loss_over_kept_tokens() -> None:
    """A padded row's loss equals the unpadded row's: cross-entropy plus the weighted router losses, as training
    adds them (ModelOutput.aux_loss), padding left out of both."""
    hf = hf_model("diff_v2")
    ids, mask = left_padded(PROMPTS)
    ids, mask = ids[1:], mask[1:]  # the short prompt, with 5 pads
    assert not mask.all()
    prompt = PROMPTS[1][None]
    out = hf.model(prompt)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), prompt[:, 1:].flatten()) + out.aux_loss
    padded = hf(ids, attention_mask=mask, labels=ids, use_cache=False, output_router_logits=True)
    torch.testing.assert_close(padded.loss, expected)
    torch.testing.assert_close(padded.aux_loss, out.aux_loss)
    assert len(padded.router_logits) == 2 and padded.router_logits[0].shape == (ids.numel(), 4)
    padded.loss.backward()
    assert hf.model.layers[0].moe.experts.w1.grad.abs().sum() > 0


def test_auto_classes_know_the_model_after_import_moe_diff(tmp_path) -> None:
    hf = hf_model("diff", tied=True)
    hf.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is MoeDiffForCausalLM and again.model.cfg == hf.model.cfg
    theirs, ours = again.state_dict(), hf.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert again.model.output.weight is again.model.tok_embeddings.weight


def test_bad_inputs_are_named() -> None:
    hf = hf_model("standard")
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        hf(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(torch.zeros(1, 4, dtype=torch.long), inputs_embeds=torch.zeros(1, 4, 32))


@pytest.mark.parametrize("first", ["moe_diff.hf.modeling", "moe_diff.hf.configuration", "moe_diff"])
def test_auto_classes_learn_the_model_whichever_module_is_imported_first(first: str) -> None:
    import subprocess
    import sys
    code = (f"import {first}\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            "config = AutoConfig.for_model('moe_diff', n_heads=4, n_kv_heads=2, dim=32, n_layers=1, ffn_dim=32)\n"
            "print(type(AutoModelForCausalLM.from_config(config)).__name__)")
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "MoeDiffForCausalLM", run.stderr[-2000:]
