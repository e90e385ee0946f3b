"""moe-diff: sparse Mixture-of-Experts decoders with differential attention.

The public API: scripts and notebooks import from here; the modules behind it may move.

    import moe_diff
    cfg = moe_diff.load_config("configs/tiny.yaml", ["model.attention=diff_v2"])
    model = moe_diff.MoEDiffTransformer(cfg.model)
    moe_diff.save(model, "ckpt/")                    # config.yaml + model.safetensors
    model = moe_diff.open_model("runs/tiny").model   # any checkpoint form: single file, step-N, a run
    tokens = moe_diff.generate(model, prompt, max_new_tokens=64)
"""

from moe_diff.checkpoint import (
    CheckpointError,
    StoredModel,
    from_hf_mixtral,
    load,
    open_model,
    save,
    to_hf_mixtral,
)
from moe_diff.config import (
    Config,
    ConfigError,
    DataConfig,
    Kernels,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    load_config,
)
from moe_diff.errors import DataError, MoeDiffError, UsageError
from moe_diff.hf import register_with_transformers
from moe_diff.inference.generation import generate, stream
from moe_diff.model import ModelOutput, MoEDiffTransformer, Routing

__all__ = ["CheckpointError", "Config", "ConfigError", "DataConfig", "DataError", "Kernels", "ModelConfig",
           "ModelOutput", "MoeDiffError", "MoEDiffTransformer", "ParallelConfig", "Routing", "StoredModel",
           "TrainConfig", "UsageError", "from_hf_mixtral", "generate", "load", "load_config", "open_model", "save",
           "stream", "to_hf_mixtral"]

register_with_transformers()  # transformers' Auto classes learn model_type 'moe_diff' (see moe_diff.hf)
