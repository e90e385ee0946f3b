"""Attention diagnostics: the learned lambda, the two softmax maps and their difference, how much
attention lands outside each query's few strongest keys, and the largest activations per layer.

Maps are recomputed from each attention layer's own input (captured by a hook), so the forward
pass itself is untouched. Legend: B batch, T tokens, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_diff.data import Batch
from moe_diff.kernels.diff_attention import attention_scores
from moe_diff.kernels.mask import AttentionMask
from moe_diff.model import Attention, DiffAttention, DiffV2Attention, MoEDiffTransformer
from moe_diff.plotting import heatmap, pyplot, save

NOISE_TOP_KEYS = 4  # "signal" is a query's 4 strongest keys; the rest of its attention is noise mass
OUTLIER_RANKS = (1, 2, 3, 10, 100)  # the k-th largest absolute values reported, as in the DIFF Transformer paper
OUTLIER_NAMES = [f"top{rank}" for rank in OUTLIER_RANKS] + ["median"]  # outlier_stats' keys


@dataclass
class LayerMaps:
    combined: torch.Tensor  # [B, H, T, T] the map applied to the values (diff: A1 - lambda A2)
    first: torch.Tensor | None  # [B, H, T, T] A1 (diff modes)
    second: torch.Tensor | None  # [B, H, T, T] A2
    lam: torch.Tensor | None  # V1: scalar; V2: [B, T, H]
    visible: torch.Tensor  # [B, T, T] True where the query sees the key (the same for every head)


def layer_scores(module: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: AttentionMask) -> list[torch.Tensor]:
    """The attention logits of each softmax map, [B, H, T, T] with -inf where a key is hidden: diff's two maps;
    one otherwise (diff_v2's paired heads interleaved, as it lays them out)."""
    q, k, _ = module.project(x, cos, sin)
    if isinstance(module, DiffAttention):
        B, T, _, d = q.shape
        q, k = q.view(B, T, -1, 2, d), k.view(B, T, -1, 2, d)
        return [attention_scores(q[..., i, :], k[..., i, :], mask).flatten(1, 2) for i in range(2)]
    return [attention_scores(q, k, mask).flatten(1, 2)]


def layer_maps(module: Attention, x: torch.Tensor, scores: list[torch.Tensor]) -> LayerMaps:
    """The maps a layer applies to its values, from its input `x` and its layer_scores."""
    visible = scores[0][:, 0].isfinite()  # [B, T, T]: hidden keys' logits are -inf in every head
    if isinstance(module, DiffAttention):
        first, second = (score.softmax(dim=-1) for score in scores)
        lam = module.lambda_value()
        return LayerMaps(first - lam * second, first, second, lam, visible)
    probs = scores[0].softmax(dim=-1)  # [B, Hq, T, T]
    if isinstance(module, DiffV2Attention):
        lam = module.lambda_value(x)  # [B, T, H]
        first, second = probs[:, 0::2], probs[:, 1::2]
        return LayerMaps(first - lam.permute(0, 2, 1)[..., None] * second, first, second, lam, visible)
    return LayerMaps(probs, None, None, None, visible)


def outlier_stats(values: list[torch.Tensor]) -> dict[str, float]:
    """The largest absolute values of all `values` together, as the DIFF Transformer paper reports activation
    outliers: top-1, top-2, top-3, top-10 and top-100 (the k-th largest), and the median (the lower one of an
    even count)."""
    magnitude = torch.cat([value.detach().abs().flatten().double() for value in values])
    top = magnitude.topk(min(max(OUTLIER_RANKS), magnitude.numel())).values
    found = {f"top{rank}": top[rank - 1].item() for rank in OUTLIER_RANKS if rank <= top.numel()}
    return found | {"median": magnitude.kthvalue((magnitude.numel() + 1) // 2).values.item()}


def noise_mass(maps: torch.Tensor, top: int = NOISE_TOP_KEYS) -> float:
    """Mean share of each query's absolute attention weight outside its `top` strongest keys."""
    weight = maps.abs()
    total = weight.sum(-1)
    strongest = weight.topk(min(top, weight.shape[-1]), dim=-1).values.sum(-1)
    return ((total - strongest) / total.clamp_min(1e-30)).mean().item()


def attention_entropy(maps: torch.Tensor) -> float:
    """Mean entropy (nats) of each query's absolute attention weights, normalised to sum to one."""
    weight = maps.abs()
    p = weight / weight.sum(-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()


def _distribution(values: torch.Tensor) -> dict[str, float]:
    values = values.double().flatten()
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"mean": values.mean().item(), "p10": q[0], "p50": q[1], "p90": q[2]}


class Capture:
    """Hooks that keep each attention layer's inputs and each block's output during one forward pass."""

    def __init__(self, model: MoEDiffTransformer):
        self.model = model
        self.inputs: list[tuple] = []
        self.outputs: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        for block in self.model.layers:
            self._handles.append(block.attention.register_forward_pre_hook(
                lambda module, args: self.inputs.append((module, *args))))
            self._handles.append(block.register_forward_hook(
                lambda module, args, output: self.outputs.append(output[0].detach())))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def attention_stats(model: MoEDiffTransformer, batch: Batch) -> tuple[dict[str, Any], list[LayerMaps]]:
    """Per layer: lambda, noise mass, entropy, largest activations; the activation outliers of all layers together
    (attention logits of the keys each query sees, and the blocks' hidden states); plus every layer's maps."""
    model.eval()
    with Capture(model) as capture:
        model(batch.tokens, batch.positions, batch.document_ids)
    layers, all_maps, logits = [], [], []
    for (module, x, cos, sin, mask), hidden in zip(capture.inputs, capture.outputs, strict=True):
        scores = layer_scores(module, x, cos, sin, mask)
        logits += [score[torch.isfinite(score)] for score in scores]
        maps = layer_maps(module, x, scores)
        magnitude = hidden.abs().flatten().double()
        stats: dict[str, Any] = {
            "noise_mass": noise_mass(maps.combined), "entropy": attention_entropy(maps.combined),
            "max_activation": magnitude.max().item(),
            "activation_p99_9": magnitude.kthvalue(max(1, int(0.999 * len(magnitude)))).values.item(),
        }
        if maps.first is not None:
            stats["noise_mass_first_map"] = noise_mass(maps.first)
        if isinstance(module, DiffAttention):
            stats["lambda"] = maps.lam.item()
        elif isinstance(module, DiffV2Attention):
            stats["lambda"] = _distribution(maps.lam)
        layers.append(stats)
        all_maps.append(maps)
    outliers = {"attention_logits": outlier_stats(logits), "hidden_states": outlier_stats(capture.outputs)}
    return {"attention": model.cfg.attention, "layers": layers, "outliers": outliers}, all_maps


def plot_maps(all_maps: list[LayerMaps], out: Path, tokens: int = 48) -> Path:
    """Head 0 of the first sequence, per layer: the first map, the second map and the combined map (a diverging
    map centred on 0 in the diff modes), hidden keys masked."""
    plt = pyplot()
    panels = 3 if all_maps[0].first is not None else 1
    figure, axes = plt.subplots(len(all_maps), panels, figsize=(3.4 * panels, 3 * len(all_maps)), squeeze=False)
    for layer, maps in enumerate(all_maps):
        shown = [("combined", maps.combined, False)] if panels == 1 else [
            ("A1", maps.first, False), ("A2", maps.second, False), ("A1 - λ A2", maps.combined, True)]
        hidden = ~maps.visible[0, :tokens, :tokens].cpu().numpy()
        for axis, (name, values, centred) in zip(axes[layer], shown, strict=True):
            heatmap(axis, values[0, 0, :tokens, :tokens].float().cpu().numpy(), f"layer {layer}: {name}", "key",
                    "query", vmin=None if centred else 0, hidden=hidden, centred=centred)
    return save(figure, out / "attention_maps.png")
