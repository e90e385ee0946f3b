"""One forward and backward pass of a freshly initialised model: does the configuration run?"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_diff.config import ModelConfig
from moe_diff.model import MoEDiffTransformer
from moe_diff.routing.summary import layer_summary


@dataclass
class ForwardCheck:
    loss: float  # next-token cross-entropy on random tokens; about ln(vocab_size) at init
    uniform_loss: float  # ln(vocab_size)
    aux_loss: float
    seconds: float  # forward plus backward, one pass
    expert_share: list[list[float]]  # per layer, share of (token, slot) assignments per expert


def forward_check(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> ForwardCheck:
    torch.manual_seed(seed)
    model = MoEDiffTransformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    start = time.perf_counter()
    out = model(tokens)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    (loss + out.aux_loss).backward()
    seconds = time.perf_counter() - start
    shares = layer_summary(out.routings)["expert_share"]
    return ForwardCheck(loss.item(), math.log(cfg.vocab_size), out.aux_loss.item(), seconds, shares)
