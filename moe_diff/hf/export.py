"""`moe-diff export --format hf`: a directory that transformers loads through its Auto classes after
`import moe_diff`, or through `trust_remote_code` (config.json's auto_map and two small files that import the
installed package) without it; lm-evaluation-harness and PEFT load it the same way."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig

from moe_diff.config import KERNEL_FIELDS
from moe_diff.data.tokenizers import Tokenizer, check_vocabulary
from moe_diff.hf.configuration import MoeDiffConfig
from moe_diff.hf.modeling import MoeDiffForCausalLM
from moe_diff.hf.tokenizer import write_tokenizer
from moe_diff.model import MoEDiffTransformer

MAX_SHARD_SIZE = "5GB"  # safetensors files above this are split, with model.safetensors.index.json
REMOTE_CODE = {  # file name -> (class, the module of the installed package that defines it)
    "configuration_moe_diff.py": ("MoeDiffConfig", "moe_diff.hf.configuration"),
    "modeling_moe_diff.py": ("MoeDiffForCausalLM", "moe_diff.hf.modeling"),
}
AUTO_CLASSES = {"MoeDiffConfig": "AutoConfig", "MoeDiffForCausalLM": "AutoModelForCausalLM"}


def remote_code(class_name: str, module: str) -> str:
    """A trust_remote_code file: the class, from the installed package (transformers names the package to install
    when it is missing)."""
    return (f'"""{class_name} of a moe-diff model, from the installed moe_diff package (pip install moe-diff)."""\n\n'
            f"from {module} import {class_name}\n\n__all__ = [\"{class_name}\"]\n")


def hf_model(model: MoEDiffTransformer, eot_id: int | None = None) -> MoeDiffForCausalLM:
    """The transformers model around `model`'s own modules (no copy of its tensors)."""
    config = MoeDiffConfig.from_model_config(model.cfg, eos_token_id=eot_id, pad_token_id=eot_id,
                                             dtype=model.tok_embeddings.weight.dtype)
    with torch.device("meta"):
        wrapper = MoeDiffForCausalLM(config)
    wrapper.model = model
    wrapper.generation_config = GenerationConfig(eos_token_id=eot_id, pad_token_id=eot_id)
    return wrapper


def save_hf(model: MoEDiffTransformer, tokenizer: Tokenizer, directory: Path,
            max_shard_size: str | int = MAX_SHARD_SIZE) -> Path:
    """Write weights (safetensors), config.json with auto_map, generation_config.json, the tokenizer files and the
    trust_remote_code files into `directory`, which must not exist or be empty: written beside it, then moved."""
    check_vocabulary(model.cfg.vocab_size, tokenizer)
    wrapper = hf_model(model, tokenizer.eot_id)
    for name in KERNEL_FIELDS:  # where it is loaded picks its kernels, not where it was exported
        setattr(wrapper.config, name, "auto")
    wrapper.config.auto_map = {AUTO_CLASSES[cls]: f"{file.removesuffix('.py')}.{cls}"
                               for file, (cls, _) in REMOTE_CODE.items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        wrapper.save_pretrained(staging, max_shard_size=max_shard_size)
        write_tokenizer(tokenizer, staging, model.cfg.max_seq_len)
        for file, (cls, module) in REMOTE_CODE.items():
            (staging / file).write_text(remote_code(cls, module))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # as a plain mkdir makes it (mkdtemp's is private)
        if directory.exists():
            directory.rmdir()  # empty (the caller refused anything else)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
