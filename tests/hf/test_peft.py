"""PEFT LoRA on a moe-diff model: the attention projections as modules, the stacked expert weights through PEFT's
parameter targeting; a few steps on the standard library's sources lower the loss, merging keeps the logits and
the merged model saves, reloads and exports."""

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import moe_diff
from moe_diff.data.tokenizers import ByteTokenizer
from moe_diff.hf.export import save_hf
from tests.helpers import JSON_PACKAGE
from tests.hf.test_transformers_model import hf_model

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wk", "wv", "wo"],
                  target_parameters=["experts.w1", "experts.w2", "experts.w3"])


def corpus_batch() -> torch.Tensor:
    text = (Path(JSON_PACKAGE) / "decoder.py").read_text()
    ids = torch.from_numpy(ByteTokenizer().encode(text))
    return ids[: 8 * 48].view(8, 48)


def test_lora_trains_merges_and_exports(tmp_path: Path) -> None:
    hf = hf_model("diff", window=None)
    before = {name: value.clone() for name, value in hf.model.state_dict().items()}
    peft_model = get_peft_model(hf, LORA)
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert any("experts" in name for name in trainable) and any("wq.lora_A" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    batch = corpus_batch()
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=batch[:2], use_cache=False).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=batch[:2], use_cache=False).logits, adapted, rtol=1e-4, atol=1e-5)
    after = merged.model.state_dict()
    assert after.keys() == before.keys()
    for name in ("layers.0.moe.experts.w1", "layers.1.moe.experts.w2", "layers.0.attention.wq.weight"):
        assert (after[name] - before[name]).abs().max() > 0, name
    save_hf(merged.model, ByteTokenizer(), tmp_path / "merged")
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(reloaded(input_ids=batch[:2]).logits, adapted, rtol=1e-4, atol=1e-5)
        opened = moe_diff.open_model(tmp_path / "merged").model.eval()
        assert torch.equal(opened(batch[:2]).logits, reloaded(input_ids=batch[:2]).logits)
