"""The moe-diff decoder as a vLLM model, built from vLLM's layers: paged KV cache, continuous batching, tensor
parallelism. The formulas are moe_diff.model's; only the layout of the heads is vLLM's.

Legend: T tokens of the batch (all sequences flattened), d head_dim, H this rank's heads of the fused projection
(see `layout`), E experts.

Each attention mode is one stock vLLM Attention per layer over the paged cache:
- standard: Mixtral's grouped-query attention, heads of width d.
- diff_v2: 2·n_heads query heads of width d; out_h = o_2h - sigmoid(x · lambda_projᵀ)_h · o_2h+1.
- diff (V1): heads of width 2d. Kv group j caches the key [k1_j, k2_j] and its 2d-wide value; the query heads
  2h and 2h+1 are [q1_h, 0] and [0, q2_h], so with scale 1/sqrt(d) they score q1·k1 and q2·k2 against the same
  values and return A1 v and A2 v. The cache holds 2·n_kv_heads·d numbers per token and layer, as moe-diff's own
  cache (and standard attention) does; the zero halves make the attention FLOPs per key (scores and values)
  8·d·n_heads against moe-diff's 6·d·n_heads. The head width vLLM gets is `head_width`: d in standard and
  diff_v2, 2d in diff (on a CPU, one of CPU_HEAD_WIDTHS).
"""

# no `from __future__ import annotations`: vLLM's support_torch_compile reads forward's annotations as types
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.attention import Attention as PagedAttention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from moe_diff.config import ModelConfig
from moe_diff.model import lambda_init_for_layer
from moe_diff.vllm import check_servable, head_width

# the hf export's names (`model.` + the moe-diff state dict) onto this model's
WEIGHTS_MAPPER = WeightsMapper(
    orig_to_new_stacked={".attention.wq.": (".attention.qkv.", "q"), ".attention.wk.": (".attention.qkv.", "k"),
                         ".attention.wv.": (".attention.qkv.", "v")},
    orig_to_new_prefix={"model.output.": "lm_head."},
)
STACKED_EXPERTS = (".moe.experts.w1", ".moe.experts.w2", ".moe.experts.w3")  # [E, F, D], [E, D, F], [E, F, D]


class Attention(nn.Module):
    """Standard grouped-query attention (Mixtral's)."""

    queries_per_head = 1  # attention query heads per projected query head (diff: [q1, 0] and [0, q2])

    def __init__(self, cfg: ModelConfig, layer_index: int, max_position: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.head_dim = d = cfg.resolved_head_dim
        width, heads, kv_heads = self.layout(cfg)
        self.qkv = QKVParallelLinear(cfg.dim, width, heads, kv_heads, bias=False, quant_config=quant_config,
                                     prefix=f"{prefix}.qkv")
        self.wo = RowParallelLinear(cfg.n_heads * d, cfg.dim, bias=False, quant_config=quant_config,
                                    prefix=f"{prefix}.wo")
        self.rotary_emb = get_rope(d, max_position=max_position, is_neox_style=True,  # neox style: rotate-half
                                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        self.attn = PagedAttention(self.queries_per_head * self.qkv.num_heads, width, d ** -0.5,
                                   num_kv_heads=self.qkv.num_kv_heads, cache_config=cache_config,
                                   quant_config=quant_config, per_layer_sliding_window=cfg.sliding_window,
                                   prefix=f"{prefix}.attn")

    @staticmethod
    def layout(cfg: ModelConfig) -> tuple[int, int, int]:
        """(width, query heads, kv heads) of the heads as the fused projection (and tensor parallelism) splits wq,
        wk and wv."""
        return head_width(cfg), cfg.n_heads, cfg.n_kv_heads

    def project(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's q, k and v [T, heads · width], rotary applied to each d-wide part of q and k."""
        qkv, _ = self.qkv(x)
        q_size, kv_size = self.qkv.num_heads * self.qkv.head_size, self.qkv.num_kv_heads * self.qkv.head_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.wo(self.attn(*self.project(positions, x)))
        return out


class DiffAttention(Attention):
    """Differential attention (V1): heads 2h and 2h+1 of wq form differential head h, kv heads likewise."""

    queries_per_head = 2

    def __init__(self, cfg: ModelConfig, layer_index: int, max_position: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__(cfg, layer_index, max_position, cache_config, quant_config, prefix)
        d = self.head_dim
        self.lambda_init = lambda_init_for_layer(layer_index)
        # float32: moe-diff computes λ in the wider of float32 and the model's dtype
        self.lambda_q1 = nn.Parameter(torch.empty(d, dtype=torch.float32), requires_grad=False)
        self.lambda_k1 = nn.Parameter(torch.empty(d, dtype=torch.float32), requires_grad=False)
        self.lambda_q2 = nn.Parameter(torch.empty(d, dtype=torch.float32), requires_grad=False)
        self.lambda_k2 = nn.Parameter(torch.empty(d, dtype=torch.float32), requires_grad=False)
        self.subln = RMSNorm(2 * d, eps=cfg.norm_eps)

    @staticmethod
    def layout(cfg: ModelConfig) -> tuple[int, int, int]:
        return head_width(cfg), cfg.n_heads // 2, cfg.n_kv_heads // 2  # (q1, q2), (k1, k2), v: one head

    def lambda_value(self) -> torch.Tensor:
        """exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, a 0-dim float32 tensor."""
        dot1 = (self.lambda_q1 * self.lambda_k1).sum()
        dot2 = (self.lambda_q2 * self.lambda_k2).sum()
        return dot1.exp() - dot2.exp() + self.lambda_init

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        q, k, v = self.project(positions, x)
        n_tokens = q.shape[0]
        q1, q2 = q.view(n_tokens, -1, 2, d).unbind(2)  # [T, H, d] each
        q = torch.stack([F.pad(q1, (0, d)), F.pad(q2, (d, 0))], dim=2).flatten(1)  # [T, H, 2, 2d]: [q1, 0], [0, q2]
        out = self.attn(q, k, v).view(n_tokens, -1, 2, 2 * d)  # [T, H, 2, 2d]: A1 v, A2 v
        out = out[:, :, 0].float() - self.lambda_value() * out[:, :, 1].float()  # [T, H, 2d]
        out = self.subln(out.to(x.dtype).view(-1, 2 * d)) * (1 - self.lambda_init)
        out, _ = self.wo(out.view(n_tokens, -1))
        return out


class DiffV2Attention(Attention):
    """Differential attention V2: query heads 2h and 2h+1 share a kv head; lambda is per token and head."""

    def __init__(self, cfg: ModelConfig, layer_index: int, max_position: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__(cfg, layer_index, max_position, cache_config, quant_config, prefix)
        # float32 and unquantised: moe-diff computes λ in the wider of float32 and the model's dtype
        self.lambda_proj = ColumnParallelLinear(cfg.dim, cfg.n_heads, bias=False, params_dtype=torch.float32,
                                                prefix=f"{prefix}.lambda_proj")

    @staticmethod
    def layout(cfg: ModelConfig) -> tuple[int, int, int]:
        return head_width(cfg), 2 * cfg.n_heads, cfg.n_kv_heads

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lam = torch.sigmoid(self.lambda_proj(x.float())[0])  # [T, H/2]
        out = self.attn(*self.project(positions, x)).view(x.shape[0], -1, 2, self.head_dim)  # [T, H/2, 2, d]
        out = out[:, :, 0].float() - lam[..., None] * out[:, :, 1].float()
        out, _ = self.wo(out.to(x.dtype).flatten(1))
        return out


ATTENTION_CLASSES: dict[str, type[Attention]] = {
    "standard": Attention, "diff": DiffAttention, "diff_v2": DiffV2Attention,
}


class MoE(nn.Module):
    """Router (float32 logits, softmax over all experts, top-k, renormalised; an expert bias, where the model has
    one, only selects) and vLLM's fused SwiGLU experts, sharded over tensor-parallel ranks."""

    def __init__(self, cfg: ModelConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.gate = GateLinear(cfg.dim, cfg.n_experts, out_dtype=torch.float32, force_fp32_compute=True,
                               prefix=f"{prefix}.gate")
        routing: dict[str, object] = {}
        # aux-loss-free balancing: the bias selects, the unbiased probabilities weigh. vLLM applies a selection bias
        # only in grouped top-k (its CPU router drops it otherwise), which with one group is top-k of probs + bias
        if cfg.expert_bias_rate:
            self.expert_bias = nn.Parameter(torch.zeros(cfg.n_experts, dtype=torch.float32), requires_grad=False)
            routing = dict(use_grouped_topk=True, num_expert_group=1, topk_group=1,
                           e_score_correction_bias=self.expert_bias)
        self.experts = FusedMoEFactory(num_experts=cfg.n_experts, top_k=cfg.top_k, hidden_size=cfg.dim,
                                       intermediate_size=cfg.ffn_dim, renormalize=True, scoring_func="softmax",
                                       router_logits_dtype=torch.float32, quant_config=quant_config,
                                       prefix=f"{prefix}.experts", ckpt_names=("w1", "w2", "w3"), **routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.gate(x)  # [T, E]
        return self.experts(x, logits)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, max_position: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = ATTENTION_CLASSES[cfg.attention](cfg, layer_index, max_position, cache_config,
                                                          quant_config, prefix=f"{prefix}.attention")
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.moe = MoE(cfg, quant_config, prefix=f"{prefix}.moe")

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the last sublayer's output, residual: the stream before it (None at the first layer); vLLM's norms add
        the two as they normalise."""
        if residual is None:
            x, residual = self.attention_norm(x), x
        else:
            x, residual = self.attention_norm(x, residual)
        x, residual = self.ffn_norm(self.attention(positions, x), residual)
        return self.moe(x), residual


@support_torch_compile
class MoeDiffModel(nn.Module):
    """Embedding, blocks and final norm: the hidden states the head turns into logits."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.cfg = cfg = vllm_config.model_config.hf_config.model_config()
        check_servable(cfg, on_cpu=current_platform.is_cpu())
        # rotary angles for every position vLLM may be asked for: with a sliding window, beyond max_seq_len too
        max_position = max(cfg.max_seq_len, vllm_config.model_config.max_model_len)
        self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, prefix=f"{prefix}.tok_embeddings")
        self.layers = nn.ModuleList(Block(cfg, i, max_position, vllm_config.cache_config, vllm_config.quant_config,
                                          prefix=f"{prefix}.layers.{i}") for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


def unstacked_experts(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The export's weights with each stacked expert tensor (`...moe.experts.w1` [E, F, D]) as E per-expert ones
    (`...moe.experts.{e}.w1.weight`), as vLLM's fused MoE layer loads them."""
    for name, tensor in weights:
        if name.endswith(STACKED_EXPERTS):
            stem, weight = name.rsplit(".", 1)
            yield from ((f"{stem}.{e}.{weight}.weight", expert) for e, expert in enumerate(tensor))
        else:
            yield name, tensor


class MoeDiffForCausalLM(nn.Module):
    """A moe-diff model (any attention mode) served by vLLM, loaded from a `moe-diff export --format hf` directory."""

    packed_modules_mapping = {"qkv": ["wq", "wk", "wv"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.model = MoeDiffModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        cfg = self.model.cfg
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.dim, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if cfg.tie_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.tok_embeddings)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(unstacked_experts(weights), mapper=WEIGHTS_MAPPER)
