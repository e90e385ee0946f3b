"""The moe-diff model as a transformers causal LM: the project's own MoEDiffTransformer under `model.` (same
modules, kernels and backends), its keys and values kept in a transformers Cache, so that `generate` (greedy,
sampling, beam search, batched with left padding), PEFT and lm-evaluation-harness work on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from moe_diff.hf.configuration import MoeDiffConfig
from moe_diff.hf.fields import BASE_MODEL, MODEL_TYPE
from moe_diff.kernels.mask import AttentionMask, causal_window_mask
from moe_diff.model import ModelOutput, MoEDiffTransformer, Routing

# transformers 5.2x renamed the output's `past_key_values` to `cache`
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
IGNORE_INDEX = -100  # transformers' label for positions that carry no loss


class CacheLayer(torch.nn.Module):
    """One layer's share of a transformers Cache, in the form the model's attention uses a KV cache: `update`
    stores the new keys and values and returns the visible ones ([B, S, kv heads, d]); `mask` (asked of layer 0
    before any update) gives the next update's mask from the window rule and the 2-D attention mask. A module
    without tensors of its own, as the attention's `kv_cache` slot holds modules."""

    def __init__(self, cache: Cache, layer_index: int, window: int | None, real: torch.Tensor):
        super().__init__()
        self.cache, self.layer_index, self.window = cache, layer_index, window
        self.real = real  # [B, past + T] bool: True for the tokens the attention mask keeps

    def mask(self, n_new: int) -> AttentionMask:
        past = self.cache.get_seq_length(self.layer_index)
        if past == 0 and bool(self.real.all()):
            return AttentionMask(self.window)  # a first forward without padding: the plain rule, fast paths
        n_keys, first_key = self.cache.get_mask_sizes(n_new, self.layer_index)
        device = self.real.device
        query_index = torch.arange(past, past + n_new, device=device)
        key_index = torch.arange(first_key, first_key + n_keys, device=device)
        key_real = self.real[:, key_index.clamp(max=self.real.shape[1] - 1)] & (key_index < self.real.shape[1])
        visible = causal_window_mask(query_index, key_index, self.window)[None] & key_real[:, None, :]
        visible |= query_index[:, None] == key_index[None, :]  # a padding query sees itself (no empty row)
        return AttentionMask(self.window, explicit=visible)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_index)
        return keys.transpose(1, 2), values.transpose(1, 2)


@contextlib.contextmanager
def cache_layers(model: MoEDiffTransformer, cache: Cache | None, real: torch.Tensor) -> Iterator[None]:
    """Every layer's attention keeps its keys and values in `cache` inside the block (nothing without one)."""
    if cache is None:
        yield
        return
    for index, block in enumerate(model.layers):
        block.attention.kv_cache = CacheLayer(cache, index, model.cfg.sliding_window, real)
    try:
        yield
    finally:
        model.clear_caches()


def positions_from_mask(real: torch.Tensor) -> torch.Tensor:
    """Rotary positions [B, L] counted from each row's first kept token (padding at 0), as moe_diff.generate
    counts them."""
    return (real.long().cumsum(-1) - 1).clamp_min(0)


def kept_routings(routings: list[Routing], keep: torch.Tensor) -> list[Routing]:
    """The routings of the tokens `keep` [N] marks, for router losses that leave padding out."""
    return [Routing(r.logits[keep], r.probs[keep], r.expert_ids[keep], r.weights[keep]) for r in routings]


class MoeDiffForCausalLM(PreTrainedModel, GenerationMixin):
    """A moe-diff decoder (any attention mode) with transformers' interface: loss from `labels` (cross-entropy plus
    the router losses, as training adds them, over the tokens the attention mask keeps), `router_logits`, and a
    transformers Cache (a sliding-window one where the config has a window)."""

    config_class = MoeDiffConfig
    base_model_prefix = BASE_MODEL  # self.model: the project's model
    _no_split_modules = ["Block"]
    _tied_weights_keys = {f"{BASE_MODEL}.output.weight": f"{BASE_MODEL}.tok_embeddings.weight"}

    def __init__(self, config: MoeDiffConfig):
        super().__init__(config)
        self.model = MoEDiffTransformer(config.model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, MoEDiffTransformer):
            module.init_weights()  # the project's own initialisation, for a model built from a config

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.output

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.output = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                output_router_logits: bool | None = None, logits_to_keep: int = 0, cache: Cache | None = None,
                **kwargs: Any) -> MoeCausalLMOutputWithPast:
        """input_ids [B, T]; attention_mask [B, past + T] (1 keeps a token, 0 is padding); position_ids [B, T]
        (default: counted from each row's first kept token); past_key_values (or `cache`, its newer name) a
        transformers Cache; labels [B, T] (-100: no loss), shifted inside."""
        for name in ("inputs_embeds", "output_attentions", "output_hidden_states"):
            if kwargs.get(name) is not None and kwargs.get(name) is not False:
                raise ValueError(f"MoeDiffForCausalLM does not support {name}")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and not self.training:
            cache = DynamicCache(config=self.config)
        batch, n_new = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        real = self._kept_tokens(attention_mask, batch, past + n_new, input_ids.device)
        positions = positions_from_mask(real)[:, past:] if position_ids is None else position_ids
        padded = not bool(real.all())
        documents = real[:, past:].long() if padded and cache is None else None  # padding: a document of its own
        with cache_layers(self.model, cache, real):
            out = self.model(input_ids, positions, documents)
        new_real = real[:, past:]
        loss = None if labels is None else self._loss(out, labels, new_real)
        router_logits = (self.config.output_router_logits if output_router_logits is None
                         else output_router_logits)
        aux_loss = self._aux_loss(out, new_real) if router_logits else None
        logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         router_logits=tuple(out.router_logits) if router_logits else None,
                                         **{CACHE_FIELD: cache if use_cache else None})

    @staticmethod
    def _kept_tokens(attention_mask: torch.Tensor | None, batch: int, length: int,
                     device: torch.device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask must be 2-D [batch, past + new tokens] = {[batch, length]}, got "
                             f"{list(attention_mask.shape)}")
        return attention_mask.bool()

    def _aux_loss(self, out: ModelOutput, real: torch.Tensor) -> torch.Tensor:
        """The weighted router losses over the kept tokens."""
        return ModelOutput(out.logits, kept_routings(out.routings, real.flatten()), self.model.cfg).aux_loss

    def _loss(self, out: ModelOutput, labels: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over kept, labelled positions, plus the router losses over kept tokens."""
        targets = labels[:, 1:].masked_fill(~(real[:, 1:] & real[:, :-1]), IGNORE_INDEX)  # kept target and input
        loss = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss + self._aux_loss(out, real)


# transformers' Auto classes learn the model whichever module of the package was imported first
AutoConfig.register(MODEL_TYPE, MoeDiffConfig, exist_ok=True)
AutoModelForCausalLM.register(MoeDiffConfig, MoeDiffForCausalLM, exist_ok=True)
