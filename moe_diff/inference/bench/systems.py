"""The systems the inference benchmark times on the same prompts: this project's model (optionally with
compiled decode steps), transformers' Mixtral and vLLM's engine on the same weights, and a dense model of the same
active size."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_diff.checkpoint.mixtral import to_hf_mixtral
from moe_diff.costs import kv_cache_bytes_per_token
from moe_diff.device import synchronize
from moe_diff.errors import UsageError
from moe_diff.inference.bench.routing import force_routing
from moe_diff.inference.generation import stream
from moe_diff.model import ModelOutput, MoEDiffTransformer
from moe_diff.vllm import VLLM_MISSING, check_servable

KV_BLOCK_TOKENS = 16  # vLLM's CPU cache block: each sequence may leave one partly filled
QUIET_TICKS = 3  # ticks in a row (CPU times count in 10 ms steps) that make a process idle


@dataclass
class Timing:
    """One generation: time to the first token, the gaps between later tokens, and the experts each
    decode step read (distinct experts per layer, summed over layers; one entry per gap)."""

    ttft: float
    itls: list[float]
    experts_read: list[int]  # empty where the system does not say which experts it read (vLLM)

    @classmethod
    def pooled(cls, timings: list[Timing]) -> Timing:
        """Several generations as one: the median time to first token, all the gaps and all the steps."""
        ttfts = sorted(t.ttft for t in timings)
        return cls(ttfts[len(ttfts) // 2], [g for t in timings for g in t.itls],
                   [e for t in timings for e in t.experts_read])

    @classmethod
    def from_stamps(cls, start: float, stamps: list[float], experts_read: list[int]) -> Timing:
        """From the start time and the time each new token arrived."""
        return cls(stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)], experts_read)


class MoEDiffSystem:
    """This project's generation (`moe_diff.stream`), eager or with compiled decode steps."""

    in_process = True  # its memory is this process's

    def __init__(self, name: str, model: MoEDiffTransformer, compile: bool,
                 hooks: list[torch.utils.hooks.RemovableHandle] | None = None):
        self.name, self.model, self.compile = name, model.eval(), compile
        self.cfg = model.cfg
        self.hooks = hooks or []  # the forced routing, removed when this system closes

    def settle(self) -> None:
        """Nothing runs on after a generation here."""

    def close(self) -> None:
        """Give the model back its own router."""
        for hook in self.hooks:
            hook.remove()

    def run(self, prompts: torch.Tensor, new_tokens: int) -> Timing:
        chosen: list[list[torch.Tensor]] = []  # per forward, per layer: copies, as CUDA graphs reuse outputs

        def keep_choices(out: ModelOutput) -> None:
            chosen.append([routing.expert_ids.clone() for routing in out.routings])

        device = prompts.device
        synchronize(device)
        start, stamps = time.perf_counter(), []
        for _ in stream(self.model, prompts, new_tokens, compile=self.compile, on_forward=keep_choices):
            synchronize(device)
            stamps.append(time.perf_counter())
        steps = chosen[len(chosen) - (len(stamps) - 1):]  # the one-token steps after the prefill's forwards
        read = [sum(ids.unique().numel() for ids in layers) for layers in steps]
        return Timing.from_stamps(start, stamps, read)


class TransformersSystem:
    """transformers' MixtralForCausalLM.generate (greedy, its default cache and attention) on the same weights."""

    in_process = True

    def __init__(self, model: MoEDiffTransformer, routing: str):
        from transformers import MixtralForCausalLM

        self.name, self.cfg = "transformers", model.cfg
        self._files = tempfile.TemporaryDirectory(prefix="moe-diff-bench-")
        directory = to_hf_mixtral(model, Path(self._files.name) / "mixtral")
        weight = model.tok_embeddings.weight
        self.model = MixtralForCausalLM.from_pretrained(directory, dtype=weight.dtype).to(weight.device).eval()
        self._chosen: list[torch.Tensor] = []
        routers = [layer.mlp.gate for layer in self.model.model.layers]
        force_routing(routers, routing, self.cfg.dim, self.cfg.n_experts, self._as_router_output)
        for router in routers:
            router.register_forward_hook(lambda module, args, output: self._chosen.append(output[2]))

    def _as_router_output(self, scores: torch.Tensor, output: tuple) -> tuple:
        """Mixtral's router output (logits, renormalised top-k weights, top-k ids) for forced scores."""
        weights, ids = scores.softmax(dim=-1).topk(self.cfg.top_k, dim=-1)
        return scores.to(output[0].dtype), (weights / weights.sum(-1, keepdim=True)).to(output[1].dtype), ids

    def run(self, prompts: torch.Tensor, new_tokens: int) -> Timing:
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            """Notes the time of every put: the prompt first, then each new token."""

            def __init__(self) -> None:
                self.stamps: list[float] = []

            def put(self, value: torch.Tensor) -> None:
                self.stamps.append(time.perf_counter())

            def end(self) -> None:
                """Nothing to finish: the stamps are read once generate returns."""

        clock, self._chosen = Clock(), []
        synchronize(prompts.device)
        start = time.perf_counter()
        with torch.no_grad():
            self.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
        stamps = clock.stamps[1:]
        layers = self.cfg.n_layers
        steps = [self._chosen[i:i + layers] for i in range(layers, len(self._chosen), layers)]  # after prefill
        read = [sum(ids.unique().numel() for ids in step) for step in steps]
        return Timing.from_stamps(start, stamps, read)

    def settle(self) -> None:
        """Nothing runs on after a generation here."""

    def close(self) -> None:
        self._files.cleanup()


def wait_until_idle(processes: list, tick_s: float = 0.05, busy_share: float = 0.1, limit_s: float = 5.0) -> None:
    """Return once `processes` (psutil) used less than `busy_share` of one core over each of QUIET_TICKS ticks in a
    row, or after `limit_s`.
    vLLM's CPU engine core keeps a core busy for about a second after its last step (measured here: a full core,
    then half a core after 0.5 s, idle after 2 s), which would slow the system timed after it."""
    import psutil  # a dependency of vLLM, not of this package

    def cpu_seconds() -> float:
        total = 0.0
        for process in processes:
            with contextlib.suppress(psutil.Error):  # one that ended uses nothing
                times = process.cpu_times()
                total += times.user + times.system
        return total

    deadline, quiet = time.monotonic() + limit_s, 0
    before = cpu_seconds()
    while quiet < QUIET_TICKS and time.monotonic() < deadline:
        time.sleep(tick_s)
        after = cpu_seconds()
        quiet = quiet + 1 if after - before < busy_share * tick_s else 0
        before = after


class VLLMSystem:
    """vLLM's engine on the same weights (this package's plugin, its paged KV cache and batching; greedy,
    ignore_eos; no prefix cache, since every round sends the same prompts), stepped here so that every decode step
    is timed as this project's are. Its compiled mode where `compile`, else eager; the model's own routing only;
    a KV cache sized for the largest batch of the longest prompt. vLLM compiles while the engine starts, which the
    warm-up generation does not include."""

    in_process = False  # the engine core runs in a process of its own, whose memory this one does not see

    def __init__(self, model: MoEDiffTransformer, compile: bool, longest: int, largest_batch: int):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError:
            raise UsageError(f"the vllm system needs vLLM in this environment: {VLLM_MISSING}") from None
        from moe_diff.hf.export import hf_model

        self.name, self.cfg = "vllm", model.cfg
        weight = model.tok_embeddings.weight
        if current_platform.is_cpu() != (weight.device.type == "cpu"):
            raise UsageError(f"the vllm system runs on vLLM's {current_platform.device_type}, the other systems on "
                             f"--device {weight.device}: time them on one device")
        check_servable(self.cfg, on_cpu=current_platform.is_cpu())
        self._files = tempfile.TemporaryDirectory(prefix="moe-diff-bench-")
        hf_model(model).save_pretrained(self._files.name)  # weights and config: prompts go in as token ids
        cache_tokens = largest_batch * (longest + KV_BLOCK_TOKENS)
        self.engine = LLM(model=self._files.name, dtype=str(weight.dtype).removeprefix("torch."), seed=0,
                          enforce_eager=not compile, skip_tokenizer_init=True, enable_prefix_caching=False,
                          max_model_len=longest, max_num_seqs=largest_batch,
                          kv_cache_memory_bytes=2 * cache_tokens * kv_cache_bytes_per_token(
                              self.cfg, weight.element_size()))
        self._requests = itertools.count()
        import psutil  # a dependency of vLLM

        self._engine_processes = psutil.Process().children(recursive=True)  # the engine core

    def run(self, prompts: torch.Tensor, new_tokens: int) -> Timing:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        engine = self.engine.llm_engine
        sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        start, stamps, produced = time.perf_counter(), [], {}
        for row in prompts.tolist():
            engine.add_request(f"bench-{next(self._requests)}", TokensPrompt(prompt_token_ids=row), sampling)
        while engine.has_unfinished_requests():
            produced |= {out.request_id: len(out.outputs[0].token_ids) for out in engine.step()}
            while len(produced) == len(prompts) and min(produced.values()) > len(stamps):  # every row's next token
                stamps.append(time.perf_counter())
        return Timing.from_stamps(start, stamps, [])

    def settle(self) -> None:
        """Wait until the engine core is idle (wait_until_idle), so that the next system runs on a quiet machine."""
        wait_until_idle(self._engine_processes)

    def close(self) -> None:
        self.engine.llm_engine.engine_core.shutdown()
        self._files.cleanup()


def dense_twin(model: MoEDiffTransformer) -> MoEDiffTransformer:
    """A dense model of the same active size: one always-chosen expert of top_k * ffn_dim (random weights)."""
    cfg = dataclasses.replace(model.cfg, n_experts=1, top_k=1, ffn_dim=model.cfg.top_k * model.cfg.ffn_dim)
    weight = model.tok_embeddings.weight
    return MoEDiffTransformer(cfg).to(device=weight.device, dtype=weight.dtype)


def moe_diff_systems(model: MoEDiffTransformer, routing: str, compile: bool) -> list[MoEDiffSystem]:
    """This project's model eager, and with `compile` also with compiled decode steps; one forced routing for both."""
    cfg = model.cfg
    hooks = force_routing([block.moe.gate for block in model.layers], routing, cfg.dim, cfg.n_experts,
                          lambda scores, output: scores.to(output.dtype))
    eager = MoEDiffSystem("moe-diff", model, compile=False, hooks=hooks)
    return [eager, MoEDiffSystem("moe-diff compiled", model, compile=True)] if compile else [eager]


def build_system(model: MoEDiffTransformer, name: str, routing: str, compile: bool, longest: int,
                 largest_batch: int) -> list:
    """The systems of `name` over `model`: 'moe-diff' (eager, and compiled too where `compile`), 'transformers',
    'vllm' (compiled where `compile`) or 'dense' (likewise) (`longest`: the most tokens of prompt and generation,
    `largest_batch`: the most prompts of one generation, for vLLM's cache)."""
    if name == "moe-diff":
        return moe_diff_systems(model, routing, compile)
    if name == "transformers":
        return [TransformersSystem(model, routing)]
    if name == "vllm":
        return [VLLMSystem(model, compile, longest, largest_batch)]
    return [MoEDiffSystem("dense", dense_twin(model), compile)]
