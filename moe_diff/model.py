"""The diff-MoE decoder: pre-norm blocks of (differential) attention and a sparse SwiGLU MoE.

Legend: B batch, T tokens, D dim, d head_dim, H (differential) heads, G kv groups,
N = B*T tokens flattened, E experts, K top_k, F ffn_dim, V vocab_size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from moe_diff.config import ModelConfig
from moe_diff.errors import UsageError
from moe_diff.kernels import attention_op, moe_experts_op
from moe_diff.kernels.mask import AttentionMask, causal_window_mask
from moe_diff.kernels.precision import compute_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * weight, computed in the compute dtype."""
        dtype = compute_dtype(x.dtype)
        return F.rms_norm(x.to(dtype), self.weight.shape, self.weight.to(dtype), self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos and signed sin for positions [B or 1, T], shaped [B or 1, T, 1, d] in the compute dtype: the
    sin of the first half of each head's dimensions is negated, as rotate-half takes -x2 there."""
    cdtype = compute_dtype(dtype)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=cdtype, device=positions.device)
                               / head_dim)
    angles = positions.to(cdtype)[..., None] * inv_freq  # [B, T, d/2]
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos()[:, :, None, :], torch.cat([-sin, sin], dim=-1)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding (Llama/Mixtral convention) of x [B, T, n, d]: x cos + [-x2, x1] sin, with
    [x2, x1] one roll of x and the sign in signed_sin."""
    xc = x.to(cos.dtype)
    return (xc * cos + xc.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of past tokens, for generation: a rolling buffer of `window` slots (of
    max_seq_len slots without a window), written in place; each slot remembers which sequence
    index it holds. k1/k2 and the 2d-wide values of diff attention are stored once per kv group.
    A one-token step has static shapes (it attends over the whole buffer), so it compiles once."""

    def __init__(self, batch: int, capacity: int, n_kv_heads: int, head_dim: int, window: int | None,
                 key_start: torch.Tensor, padded: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, capacity, n_kv_heads, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)
        self.register_buffer("slot_index", torch.full((capacity,), -1, device=device), persistent=False)
        self.register_buffer("key_start", key_start.to(device), persistent=False)  # [B] first real (unpadded) index
        self.padded = padded  # whether some row's first keys are padding (key_start > 0)
        self.register_buffer("length", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.window = window

    def mask(self, n_new: int) -> AttentionMask:
        """The mask of the next update of `n_new` tokens, [B, n_new, S] over the keys it will return (the cached
        and the new ones): the causal and window rule on sequence indices, padding hidden, and a padding query
        seeing itself (no empty softmax row). Every layer's cache is in the same state, so one serves them all."""
        if n_new == 1:  # the step attends over the whole buffer, the new token in the slot it overwrites
            new_index = self.length[None]
            slots = torch.arange(self.k.shape[1], device=new_index.device)
            key_index = torch.where(slots == new_index % self.k.shape[1], new_index, self.slot_index)
        else:
            length = int(self.length)
            new_index = torch.arange(length, length + n_new, device=self.slot_index.device)
            key_index = torch.cat([self.slot_index[:min(length, self.k.shape[1])], new_index])
        visible = causal_window_mask(new_index, key_index, self.window) & (key_index >= 0)
        if not self.padded:  # one mask for every row, as a view: attention may take it once for all
            return AttentionMask(self.window, explicit=visible.expand(len(self.key_start), -1, -1))
        visible = (visible[None] & (key_index >= self.key_start[:, None, None])) | (key_index == new_index[:, None])
        return AttentionMask(self.window, explicit=visible)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Past and new keys and values [B, S, ...], in the order mask() describes; the new ones are stored."""
        return self._step(k, v) if k.shape[1] == 1 else self._chunk(k, v)

    def _step(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token, then attend over the whole buffer: the slot it overwrites left the window."""
        new_index = self.length.clone()[None]  # not a view: the counter moves on below
        slot = new_index % self.k.shape[1]
        self.k.index_copy_(1, slot, k)
        self.v.index_copy_(1, slot, v)
        self.slot_index.index_copy_(0, slot, new_index)
        self.length.add_(1)
        return self.k, self.v

    def _chunk(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over the cached and the new keys, then store the new ones (the chunk may exceed the buffer)."""
        capacity, n_new, length = self.k.shape[1], k.shape[1], int(self.length)
        filled = min(length, capacity)  # slots are written in order, so the first `filled` are in use
        new_index = torch.arange(length, length + n_new, device=k.device)
        keys, values = torch.cat([self.k[:, :filled], k], 1), torch.cat([self.v[:, :filled], v], 1)
        kept = slice(max(0, n_new - capacity), n_new)  # a chunk longer than the buffer keeps its tail
        slots = new_index[kept] % capacity
        self.k[:, slots], self.v[:, slots], self.slot_index[slots] = k[:, kept], v[:, kept], new_index[kept]
        self.length.add_(n_new)
        return keys, values


class Attention(nn.Module):
    """Standard grouped-query attention (Mixtral's)."""

    mode = "standard"
    queries_per_head = 1  # diff V2 doubles the query heads

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.head_dim = d = cfg.resolved_head_dim
        self.n_kv_heads = cfg.n_kv_heads  # those it computes: parallel/tensor_parallel.py gives a rank its share
        self.wq = nn.Linear(cfg.dim, self.queries_per_head * cfg.n_heads * d, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * d, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * d, bias=False)
        self.wo = nn.Linear(cfg.n_heads * d, cfg.dim, bias=False)
        self.attend = attention_op(cfg.attn_backend, self.mode)
        self.kv_cache: KVCache | None = None  # set by MoEDiffTransformer.setup_caches for generation

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, query heads, d], k and v [B, S, kv heads, d] with rotary applied to q and k: S = T without a
        cache, else the cached and the new keys (which are stored)."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, -1, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.kv_cache is None:
            return q, k, v
        return q, *self.kv_cache.update(k, v)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.wo(self.attend(q, k, v, mask).flatten(2))


def lambda_init_for_layer(layer_index: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DiffAttention(Attention):
    """Differential attention (V1): heads 2h and 2h+1 form differential head h, kv heads likewise."""

    mode = "diff"

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        d = self.head_dim
        self.lambda_init = lambda_init_for_layer(layer_index)
        self.lambda_q1 = nn.Parameter(torch.zeros(d))
        self.lambda_k1 = nn.Parameter(torch.zeros(d))
        self.lambda_q2 = nn.Parameter(torch.zeros(d))
        self.lambda_k2 = nn.Parameter(torch.zeros(d))
        self.subln = RMSNorm(2 * d, cfg.norm_eps)

    def lambda_value(self) -> torch.Tensor:
        """exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, a 0-dim tensor in the compute dtype."""
        dtype = compute_dtype(self.lambda_q1.dtype)
        dot1 = (self.lambda_q1.to(dtype) * self.lambda_k1.to(dtype)).sum()
        dot2 = (self.lambda_q2.to(dtype) * self.lambda_k2.to(dtype)).sum()
        return dot1.exp() - dot2.exp() + self.lambda_init

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        B, T, _ = x.shape
        d = self.head_dim
        q, k, v = self.project(x, cos, sin)
        S = k.shape[1]  # keys: T, or the cached ones and the new ones
        out = self.attend(q.view(B, T, -1, 2, d), k.view(B, S, -1, 2, d), v.reshape(B, S, -1, 2 * d),
                          self.lambda_value(), mask)  # [B, T, H, 2d]
        out = self.subln(out) * (1 - self.lambda_init)
        return self.wo(out.flatten(2))


class DiffV2Attention(Attention):
    """Differential attention V2: query heads 2h and 2h+1 share a kv head; lambda is per token."""

    mode = "diff_v2"
    queries_per_head = 2

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.lambda_proj = nn.Linear(cfg.dim, cfg.n_heads, bias=False)

    def lambda_value(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(x lambda_proj^T): [B, T, H] in the compute dtype, for the attention input x."""
        dtype = compute_dtype(x.dtype)
        return torch.sigmoid(F.linear(x.to(dtype), self.lambda_proj.weight.to(dtype)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.wo(self.attend(q, k, v, self.lambda_value(x), mask).flatten(2))


ATTENTION_CLASSES: dict[str, type[Attention]] = {
    "standard": Attention, "diff": DiffAttention, "diff_v2": DiffV2Attention,
}


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights, computed by the configured MoE backend (an expert id of E: an
    assignment dropped for capacity, which the backend leaves out)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(cfg.n_experts, cfg.ffn_dim, cfg.dim))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.ffn_dim))
        self.w3 = nn.Parameter(torch.empty(cfg.n_experts, cfg.ffn_dim, cfg.dim))
        self.compute = moe_experts_op(cfg.moe_backend)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.compute(x, expert_ids, weights, self.w1, self.w2, self.w3)


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int64: how often each of 0..n-1 occurs in `ids`, whose values lie in 0..n-1. Unlike torch.bincount, it
    does not read the largest id back to the host (on a GPU, a wait for the device)."""
    flat = ids.flatten()
    return torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, flat, torch.ones_like(flat))


def assignment_counts(expert_ids: torch.Tensor, kept: torch.Tensor | None, n_experts: int) -> torch.Tensor:
    """[E] assignments each expert computes, from the chosen ids [N, K] and which of them capacity kept (None:
    all)."""
    if kept is None:
        return count_ids(expert_ids, n_experts)
    return count_ids(expert_ids.masked_fill(~kept, n_experts), n_experts + 1)[:n_experts]  # drops counted last


@dataclass
class Routing:
    """One MoE layer's routing decisions over its N tokens."""

    logits: torch.Tensor  # [N, E], compute dtype
    probs: torch.Tensor  # [N, E], softmax over all experts
    expert_ids: torch.Tensor  # [N, K], the chosen experts
    weights: torch.Tensor  # [N, K], renormalised over the chosen K; 0 where capacity dropped the assignment
    kept: torch.Tensor | None = None  # [N, K] bool with a capacity: the assignments that fit (None: dropless)

    @cached_property
    def counts(self) -> torch.Tensor:
        """[E] assignments each expert computes (after drops); counted when first read, never at decode."""
        return assignment_counts(self.expert_ids, self.kept, self.probs.shape[-1])

    @property
    def dropped(self) -> torch.Tensor:
        """0-dim: assignments dropped for capacity."""
        return self.expert_ids.numel() - self.counts.sum()

    @property
    def dispatched_ids(self) -> torch.Tensor:
        """[N, K] the experts' input: expert_ids with E in place of each assignment capacity dropped, so that no
        backend computes it (nor, under expert parallelism, sends it)."""
        if self.kept is None:
            return self.expert_ids
        return self.expert_ids.masked_fill(~self.kept, self.probs.shape[-1])


def within_capacity(expert_ids: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """[N, K] True where the assignment fits its expert's capacity: every token's first choice comes before
    any second choice (GShard's order), and tokens in order within a choice."""
    n_tokens, top_k = expert_ids.shape
    slot_major = expert_ids.t().flatten()  # [K*N]
    order = slot_major.argsort(stable=True)
    counts = count_ids(slot_major, n_experts)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[slot_major[order]]
    return (rank < capacity).view(top_k, n_tokens).t()


def route(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
          capacity_factor: float | None = None) -> Routing:
    """Softmax over all experts, top-k (of probs + bias: the bias only selects), weights renormalised."""
    probs = logits.softmax(dim=-1)
    expert_ids = (probs if bias is None else probs + bias).topk(top_k, dim=-1).indices
    chosen = probs.gather(-1, expert_ids)
    weights = chosen / chosen.sum(-1, keepdim=True)
    if capacity_factor is None:
        return Routing(logits, probs, expert_ids, weights)
    n_experts = probs.shape[-1]
    kept = within_capacity(expert_ids, n_experts, math.ceil(capacity_factor * expert_ids.numel() / n_experts))
    return Routing(logits, probs, expert_ids, weights * kept, kept)


def choice_counts(routing: Routing) -> torch.Tensor:
    """[E] (token, slot) choices of each expert, those capacity dropped included: the f_e counts of the
    load-balancing loss, in the probabilities' dtype."""
    return count_ids(routing.expert_ids, routing.probs.shape[-1]).to(routing.probs.dtype)


def router_losses(routing: Routing, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-balancing loss E * sum_e f_e P_e and z-loss mean(logsumexp(logits)^2). f_e is each expert's share of
    `counts` [E] (default: this layer's own choice_counts; a training job passes them summed over its
    data-parallel ranks, so that the loss balances the whole batch); P_e the mean probability over these tokens."""
    counts = choice_counts(routing) if counts is None else counts
    fraction = counts / counts.sum()
    load_balance = routing.probs.shape[-1] * (fraction * routing.probs.mean(0)).sum()
    z_loss = torch.logsumexp(routing.logits, dim=-1).square().mean()
    return load_balance, z_loss


class Router(nn.Linear):
    """Expert scores [N, E], computed in float32 (or wider) whatever the activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x.dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype))


class MoE(nn.Module):
    """Router (softmax over all experts, top-k, renormalised) and sparse experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.capacity_factor, self.jitter = cfg.top_k, cfg.capacity_factor, cfg.router_jitter
        self.gate = Router(cfg.dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)
        self.bias_rate = cfg.expert_bias_rate
        if self.bias_rate:  # aux-loss-free balancing (DeepSeek-V3): a bias that only selects, moved by the load
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        scores_input = flat
        if self.training and self.jitter:
            scores_input = flat * torch.empty_like(flat).uniform_(1 - self.jitter, 1 + self.jitter)
        bias = self.expert_bias if self.bias_rate else None
        routing = route(self.gate(scores_input), self.top_k, bias, self.capacity_factor)
        out = self.experts(flat, routing.dispatched_ids, routing.weights)
        return out.view(B, T, D), routing

    @torch.no_grad()
    def update_expert_bias(self, load: torch.Tensor) -> None:
        """Raise the bias of experts whose load [E] (assignments since the last update) is below the mean,
        lower the others'. Called once per optimizer step with the whole step's load, so it does not depend
        on how the step was split into micro-batches."""
        load = load.to(self.expert_bias.dtype)
        self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = ATTENTION_CLASSES[cfg.attention](cfg, layer_index)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask) -> tuple[torch.Tensor, Routing]:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        moe_out, routing = self.moe(self.ffn_norm(h))
        return h + moe_out, routing


@dataclass
class RouterLosses:
    load_balance: torch.Tensor  # unweighted, summed over layers
    z: torch.Tensor  # unweighted, summed over layers
    weighted: torch.Tensor  # router_aux_loss_coef * load_balance + router_z_loss_coef * z: the aux loss


class ModelOutput:
    """Logits, and the router losses computed from the layers' routings when first read (never at decode)."""

    def __init__(self, logits: torch.Tensor, routings: list[Routing], cfg: ModelConfig):
        self.logits = logits  # [B, T, V]
        self.routings = routings
        self._cfg = cfg

    @property
    def router_logits(self) -> list[torch.Tensor]:
        """Per layer [N, E] in the compute dtype."""
        return [routing.logits for routing in self.routings]

    @property
    def choice_counts(self) -> torch.Tensor:
        """[L, E] each layer's choice_counts."""
        return torch.stack([choice_counts(routing) for routing in self.routings])

    def router_losses(self, counts: torch.Tensor | None = None) -> RouterLosses:
        """The router losses summed over layers; `counts` [L, E] (router_losses) default to this forward's."""
        per_layer = [router_losses(routing, None if counts is None else counts[layer])
                     for layer, routing in enumerate(self.routings)]
        load_balance, z_loss = sum(lb for lb, _ in per_layer), sum(z for _, z in per_layer)
        weighted = self._cfg.router_aux_loss_coef * load_balance + self._cfg.router_z_loss_coef * z_loss
        return RouterLosses(load_balance, z_loss, weighted)

    @cached_property
    def _losses(self) -> RouterLosses:
        return self.router_losses()

    @property
    def load_balance_loss(self) -> torch.Tensor:
        """Unweighted, summed over layers."""
        return self._losses.load_balance

    @property
    def z_loss(self) -> torch.Tensor:
        """Unweighted, summed over layers."""
        return self._losses.z

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum over layers of the weighted router losses."""
        return self._losses.weighted


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """The generator that draws parameter `name` of a model seeded with `seed`: its own, seeded by both, so that a
    parameter's initial value does not depend on which other parameters the model has (two attention modes with
    the same seed start their shared parameters equal)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@torch.no_grad()
def init_parameter(name: str, param: torch.Tensor, n_layers: int, generator: torch.Generator | None = None) -> None:
    """Normal(0, 0.02) weights; residual-output projections scaled by 1/sqrt(2 n_layers); norms at one; lambda as
    each attention variant starts it."""
    residual_std = 0.02 / math.sqrt(2 * n_layers)
    if name.endswith("norm.weight") or name.endswith("subln.weight"):
        nn.init.ones_(param)
    elif "lambda_proj" in name:
        nn.init.zeros_(param)  # lambda starts at sigmoid(0) = 0.5 for every token and head
    elif ".lambda_" in name:
        nn.init.normal_(param, mean=0.0, std=0.1, generator=generator)
    elif name.endswith("wo.weight") or name.endswith("experts.w2"):
        nn.init.normal_(param, mean=0.0, std=residual_std, generator=generator)
    else:
        nn.init.normal_(param, mean=0.0, std=0.02, generator=generator)


class MoEDiffTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for name, param in self.named_parameters():
            init_parameter(name, param, self.cfg.n_layers)

    def update_expert_biases(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step for every layer, from the per-layer load [L, E] of one optimizer step
        (the sum of `routing.counts` over its micro-batches); nothing when expert_bias_rate is 0."""
        if self.cfg.expert_bias_rate:
            for block, layer_load in zip(self.layers, load, strict=True):
                block.moe.update_expert_bias(layer_load)

    def setup_caches(self, batch_size: int, key_start: torch.Tensor | None = None,
                     max_length: int | None = None) -> None:
        """Allocate each layer's KV cache: min(sliding_window, max_length) slots, or max_length without a
        window (default max_seq_len); key_start [B] hides a left-padded row's first key_start tokens."""
        cfg, weight = self.cfg, self.tok_embeddings.weight
        capacity = min(cfg.sliding_window or cfg.max_seq_len, max_length or cfg.max_seq_len)
        key_start = torch.zeros(batch_size, dtype=torch.long) if key_start is None else key_start
        padded = bool((key_start > 0).any())  # read once; a compiled step has one graph for each answer
        for block in self.layers:
            block.attention.kv_cache = KVCache(batch_size, capacity, block.attention.n_kv_heads, cfg.resolved_head_dim,
                                               cfg.sliding_window, key_start, padded, weight.dtype, weight.device)

    def attention_mask(self, n_tokens: int, document_ids: torch.Tensor | None) -> AttentionMask:
        """The keys each of the `n_tokens` queries may see: the window and document rule, or with KV caches the
        mask of their next update."""
        cache = self.layers[0].attention.kv_cache
        if cache is not None:
            return cache.mask(n_tokens)
        return AttentionMask(self.cfg.sliding_window, document_ids)

    def clear_caches(self) -> None:
        for block in self.layers:
            block.attention.kv_cache = None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> ModelOutput:
        """tokens [B, T]; positions [T] or [B, T] set the rotary angles only (default 0..T-1);
        document_ids [B, T] (packed sequences) keep attention inside each document."""
        positions = self._check_inputs(tokens, positions, document_ids)
        cos, sin = rope_cos_sin(positions, self.cfg.resolved_head_dim, self.cfg.rope_theta,
                                self.tok_embeddings.weight.dtype)
        mask = self.attention_mask(tokens.shape[1], document_ids)  # one rule for every layer
        h = self.tok_embeddings(tokens)
        routings = []
        for layer in self.layers:
            h, routing = layer(h, cos, sin, mask)
            routings.append(routing)
        return ModelOutput(self.output(self.norm(h)), routings, self.cfg)

    def _check_token_ids(self, tokens: torch.Tensor) -> None:
        """Every id below vocab_size. With gradients on (training), asserted on the device without reading anything
        back (on a GPU a bad id stops the process at a device-side assertion with this message, as the embedding's
        own bounds check would without it); otherwise, or on the CPU, where the assertion raises at once, a
        UsageError with the ids' range."""
        limit = f"token ids must lie in 0..{self.cfg.vocab_size - 1} (vocab_size)"
        valid = ((tokens >= 0) & (tokens < self.cfg.vocab_size)).all()
        try:
            if torch.is_grad_enabled():
                torch._assert_async(valid, limit)
            elif not valid:
                raise RuntimeError(limit)
        except RuntimeError:
            low, high = (value.item() for value in torch.aminmax(tokens))
            raise UsageError(f"{limit}, got values from {low} to {high}") from None

    def _check_inputs(self, tokens: torch.Tensor, positions: torch.Tensor | None,
                      document_ids: torch.Tensor | None) -> torch.Tensor:
        """Validate the inputs; return positions shaped [B or 1, T]."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise UsageError(f"tokens must be an integer tensor [batch, seq], got {tokens.dtype} "
                             f"of shape {list(tokens.shape)}")
        n_tokens = tokens.shape[1]
        if not 1 <= n_tokens <= self.cfg.max_seq_len:
            raise UsageError(f"sequence length {n_tokens} is outside 1..max_seq_len "
                             f"({self.cfg.max_seq_len})")
        if not torch.compiler.is_compiling():
            self._check_token_ids(tokens)
        if document_ids is not None and (document_ids.shape != tokens.shape
                                         or document_ids.dtype.is_floating_point):
            raise UsageError(f"document_ids must be an integer tensor shaped like tokens "
                             f"{list(tokens.shape)}, got {document_ids.dtype} of shape "
                             f"{list(document_ids.shape)}")
        if positions is None:
            return torch.arange(n_tokens, device=tokens.device)[None]
        if positions.dtype.is_floating_point or positions.shape not in ((n_tokens,), tokens.shape):
            raise UsageError(f"positions must be an integer tensor shaped [seq] or [batch, seq] like "
                             f"tokens {list(tokens.shape)}, got {positions.dtype} of shape "
                             f"{list(positions.shape)}")
        return positions.reshape(-1, n_tokens)
