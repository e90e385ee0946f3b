"""What several test files share: the small training config, reading a run's losses and final weights, document
ids that return to a document after others, a small model vLLM serves, and the shapes CPU SDPA is called with."""

import sysconfig
from pathlib import Path

import torch

from moe_diff.checkpoint import open_model
from moe_diff.config import Config, ModelConfig, load_config
from moe_diff.model import MoEDiffTransformer
from moe_diff.runs import METRICS_FILE, read_metrics

CONFIGS = Path(__file__).parents[1] / "configs"
JSON_PACKAGE = str(Path(sysconfig.get_paths()["stdlib"]) / "json")  # a small real corpus
# for vLLM's CPU build in tests: its KV cache takes 1 GiB (by default, most free memory), and an engine the process
# builds itself (LLM, as greedy.py and the bench's vllm system do) runs its core in that process rather than in one
# more it starts, which imports vLLM again (about 20 s an engine); the OpenAI server (AsyncLLM) starts one anyway
VLLM_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def small_config(out_dir: Path, *overrides: str) -> Config:
    """The tiny config at a size that trains in seconds, on the json package's sources."""
    return load_config(CONFIGS / "tiny.yaml", [
        "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
        "model.ffn_dim=64", "model.sliding_window=16", "train.seq_len=32", "train.batch_size=4",
        "train.max_steps=6", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=3",
        "train.eval_batches=2", "train.save_every=3", "train.sample_tokens=0", f"train.out_dir={out_dir}",
        f"data.source={JSON_PACKAGE}", "data.val_fraction=0.3", *overrides])


def sdpa_blocks(monkeypatch) -> list[tuple[int, int]]:
    """(queries, keys) of every scaled_dot_product_attention call the SDPA backend makes from now on (its inputs
    are [B, H, T, d])."""
    from moe_diff.kernels import diff_attention

    calls, call = [], diff_attention.F.scaled_dot_product_attention

    def recorded(q: torch.Tensor, k: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append((q.shape[2], k.shape[2]))
        return call(q, k, *args, **kwargs)

    monkeypatch.setattr(diff_attention.F, "scaled_dot_product_attention", recorded)
    return calls


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir / METRICS_FILE)]


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return open_model(out_dir).model.state_dict()


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)
    weights_a, weights_b = final_weights(a), final_weights(b)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def scattered_documents(n: int, seed: int) -> torch.Tensor:
    """[2, n] document ids that return to a document after others: runs of random ids and lengths, and the ids an
    attention_mask with a short hole at a random place gives (kept tokens 1 on both sides of the hole's 0s)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n,), generator=generator)
    runs = torch.randint(0, 4, (n,), generator=generator).repeat_interleave(lengths)[:n]
    hole = torch.ones(n, dtype=torch.long)
    begin = int(torch.randint(1, n // 2, (), generator=generator))
    hole[begin:begin + int(torch.randint(1, 5, (), generator=generator))] = 0
    return torch.stack([runs, hole])


def servable_model(attention: str, **overrides: object) -> MoEDiffTransformer:
    """A float32 model whose large random weights keep greedy choices far from ties; head width 32 (one of the sizes
    vLLM's CPU attention takes) and by default a window of 8, shorter than prompt and generation; with an expert
    bias rate, random expert biases (as training would have moved them)."""
    torch.manual_seed(0)
    values = dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=64, n_experts=4,
                  top_k=2, sliding_window=8, max_seq_len=128, attention=attention, rope_theta=100.0)
    model = MoEDiffTransformer(ModelConfig(**(values | overrides)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.1 if "lambda_q" in name or "lambda_k" in name else 0.4)
        for block in model.layers if model.cfg.expert_bias_rate else ():
            block.moe.expert_bias.normal_(0, 0.5)
    return model.eval()
