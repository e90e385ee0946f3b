"""Routing diagnostics: statistics that add up, a collapsed router, random-routing baselines, checkpoint
comparison with swapped experts, the trace file and the report."""

import itertools
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from moe_diff import checkpoint
from moe_diff.config import ConfigError, DataConfig, ModelConfig
from moe_diff.data import Batch
from moe_diff.diagnostics import diagnose, routing_stats
from moe_diff.diagnostics.compare import max_weight_matching
from moe_diff.model import MoEDiffTransformer, route
from moe_diff.routing.collect import collect_trace
from moe_diff.routing.trace import RoutingTrace, TraceError, load_trace, save_trace


def trace_from_logits(logits: torch.Tensor, top_k: int, sequence_length: int = 50) -> RoutingTrace:
    """A trace of a router that produced `logits` [L, N, E] for N byte tokens."""
    n_layers, n, _ = logits.shape
    routings = [route(layer, top_k) for layer in logits]
    return RoutingTrace(
        token_ids=torch.randint(0, 257, (n,), generator=torch.Generator().manual_seed(0)),
        positions=torch.arange(n) % sequence_length, document_ids=torch.arange(n) // 1000,
        sequence_ids=torch.arange(n) // sequence_length,
        expert_ids=torch.stack([r.expert_ids for r in routings]), weights=torch.stack([r.weights for r in routings]),
        probs=torch.stack([r.probs for r in routings]),
        document_names=[f"pkg{i % 3}/file{i}.py" for i in range(n // 1000 + 1)], header={"tokenizer": "byte"})


def test_counts_add_up_to_tokens_times_top_k() -> None:
    trace = trace_from_logits(torch.randn(3, 2000, 8), top_k=2)
    stats = routing_stats(trace)
    for layer in stats["layers"]:
        assert sum(layer["counts"]) == 2000 * 2
        assert sum(layer["share"]) == pytest.approx(1.0)
        assert sum(layer["utilisation"]) == pytest.approx(8.0)
        coactivation = torch.tensor(layer["coactivation"])
        assert torch.diagonal(coactivation).sum().item() == pytest.approx(2.0)  # k experts per token
        for name in ("class", "position", "domain"):
            assert sum(layer["specialisation"][name]["tokens"]) == 2000


def test_router_collapsed_onto_one_pair() -> None:
    logits = torch.zeros(2, 500, 6)
    logits[:, :, 1] = 10.0
    logits[:, :, 4] = 9.0
    stats = routing_stats(trace_from_logits(logits, top_k=2))
    for layer in stats["layers"]:
        assert layer["share"][1] == layer["share"][4] == 0.5
        assert layer["dead_experts"] == [0, 2, 3, 5]
        assert layer["coactivation"][1][4] == layer["coactivation"][4][1] == 1.0
        assert layer["max_over_mean"] == pytest.approx(3.0)
    assert any("dead experts [0, 2, 3, 5]" in flag for flag in stats["flags"])
    assert any("max/mean load 3.00" in flag for flag in stats["flags"])


def test_consecutive_rate_of_a_random_router_matches_its_expectation() -> None:
    generator = torch.Generator().manual_seed(0)
    skew = torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0, -0.5, -1.0, -2.0])
    logits = (skew + torch.randn(1, 40000, 8, generator=generator)).float()
    rates = routing_stats(trace_from_logits(logits, top_k=2, sequence_length=400))["layers"][0]["consecutive"]
    assert rates["top1_same"] == pytest.approx(rates["top1_random"], abs=0.01)
    assert rates["topk_overlap"] == pytest.approx(rates["topk_random"], abs=0.015)
    assert rates["top1_random"] > 1 / 8 + 0.05  # skewed loads raise the baseline above 1/E


def test_matching_is_optimal() -> None:
    import itertools

    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 4, 6):
        weights = torch.randint(0, 9, (n, n), generator=generator).double()
        best = max(sum(weights[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        found = max_weight_matching(weights)
        assert sorted(found) == list(range(n)) and sum(weights[i, found[i]] for i in range(n)) == best


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small random checkpoint, the same model with its experts permuted, and a tiny text corpus."""
    root = tmp_path_factory.mktemp("diag")
    texts = root / "texts"
    texts.mkdir()
    for i in range(12):
        (texts / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 'abc'\n" * 30)
    torch.manual_seed(0)
    model = MoEDiffTransformer(ModelConfig(vocab_size=260, dim=32, n_layers=2, n_heads=2, n_kv_heads=2,
                                           ffn_dim=16, n_experts=4, top_k=2, max_seq_len=128))
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight.normal_(0, 1.0)
    checkpoint.save(model, root / "model")
    permutation = torch.tensor([2, 0, 3, 1])  # new expert j is old expert permutation[j]
    with torch.no_grad():
        for layer in model.layers:
            for tensor in (layer.moe.gate.weight, layer.moe.experts.w1, layer.moe.experts.w2, layer.moe.experts.w3):
                tensor.copy_(tensor[permutation])
    checkpoint.save(model, root / "permuted")
    return {"root": root, "texts": texts, "permutation": permutation}


def diagnose_quietly(target, out, run, **kwargs):
    from rich.console import Console

    data = DataConfig(source=str(run["texts"]), val_fraction=0.4)
    return diagnose(target, out, data=data, tokenizer="byte", seq_len=32, max_tokens=512, console=Console(quiet=True),
                    **kwargs)


def test_comparing_a_checkpoint_with_itself_and_with_swapped_experts(run, tmp_path: Path) -> None:
    same = diagnose_quietly(run["root"] / "model", tmp_path / "same", run, compare=run["root"] / "model")
    for layer in same["comparison"]["layers"]:
        assert layer["top1_changed"] == layer["topk_set_changed"] == 0.0 and layer["jaccard"] == 1.0
        assert layer["load_change"] == [0.0] * 4
    swapped = diagnose_quietly(run["root"] / "model", tmp_path / "swapped", run, compare=run["root"] / "permuted")
    inverse = torch.argsort(run["permutation"]).tolist()  # old expert e is new expert inverse[e]
    for layer in swapped["comparison"]["layers"]:
        assert layer["matching"] == inverse
        assert layer["top1_changed"] > 0.3
        assert layer["top1_changed_after_matching"] == layer["topk_set_changed_after_matching"] == 0.0


def test_trace_round_trip_and_reading_a_trace(run, tmp_path: Path) -> None:
    stats = diagnose_quietly(run["root"] / "model", tmp_path / "a", run, trace_path=tmp_path / "t.safetensors")
    trace = load_trace(tmp_path / "t.safetensors")
    assert trace.n_tokens == 512 and trace.n_layers == 2 and trace.top_k == 2 and trace.n_experts == 4
    assert trace.header["tokenizer"] == "byte" and trace.document_names[0].endswith(".txt")
    save_trace(trace, tmp_path / "copy.safetensors")
    again = load_trace(tmp_path / "copy.safetensors")
    for name in ("token_ids", "positions", "document_ids", "sequence_ids", "expert_ids", "weights", "probs"):
        assert torch.equal(getattr(again, name), getattr(trace, name)), name
    from_file = diagnose_quietly(tmp_path / "t.safetensors", tmp_path / "b", run)
    assert from_file["layers"][0]["counts"] == stats["layers"][0]["counts"]
    (tmp_path / "junk.safetensors").write_bytes(b"not a trace")
    with pytest.raises(TraceError, match="cannot be read as a routing trace"):
        load_trace(tmp_path / "junk.safetensors")


class ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_opens_with_every_image(run, tmp_path: Path) -> None:
    diagnose_quietly(run["root"] / "model", tmp_path, run, compare=run["root"] / "permuted")
    parser = ImageSources()
    parser.feed((tmp_path / "report.html").read_text())
    assert len(parser.images) == 4
    for source in parser.images:
        assert (tmp_path / source).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "stats.json").is_file()


@pytest.mark.parametrize("mode", ["standard", "diff", "diff_v2"])
def test_attention_maps_reproduce_the_layer_and_stats_are_reported(mode: str, run, tmp_path: Path) -> None:
    """Each recomputed map, applied to the values, gives exactly what the attention kernel computed."""
    from moe_diff.diagnostics.attention import Capture, attention_stats, layer_maps, layer_scores
    from moe_diff.kernels import attention_op
    from moe_diff.kernels.mask import AttentionMask

    torch.manual_seed(0)
    model = MoEDiffTransformer(ModelConfig(vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                           ffn_dim=16, n_experts=4, top_k=2, max_seq_len=64, sliding_window=5,
                                           attention=mode)).double()
    tokens = torch.randint(0, 260, (2, 12))
    with Capture(model) as capture:
        model(tokens)
    module, x, cos, sin, mask = capture.inputs[1]
    maps = layer_maps(module, x, layer_scores(module, x, cos, sin, mask))
    q, k, v = module.project(x, cos, sin)
    B, T = tokens.shape
    if mode == "diff":
        expected = attention_op("reference", "diff")(q.view(B, T, -1, 2, 8), k.view(B, T, -1, 2, 8),
                                                     v.reshape(B, T, -1, 16), module.lambda_value(), AttentionMask(5))
        values = v.reshape(B, T, -1, 16).repeat_interleave(2, dim=2)
    elif mode == "diff_v2":
        expected = attention_op("reference", "diff_v2")(q, k, v, module.lambda_value(x), AttentionMask(5))
        values = v.repeat_interleave(2, dim=2)
    else:
        expected = attention_op("reference", "standard")(q, k, v, AttentionMask(5))
        values = v.repeat_interleave(2, dim=2)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", maps.combined, values), expected)
    assert torch.equal(maps.visible, AttentionMask(5).dense(T, T, x.device).expand(B, T, T))  # the rest drawn masked
    assert len(capture.outputs) == 2
    from moe_diff.data import Batch

    stats, _ = attention_stats(model, Batch(tokens, tokens, torch.arange(12).expand(2, 12), torch.zeros_like(tokens)))
    assert all(0 <= layer["noise_mass"] <= 1 for layer in stats["layers"])
    assert ("lambda" in stats["layers"][0]) == (mode != "standard")
    brute_force_logits = []  # every (query, visible key) logit of every map, one at a time
    for module, x, cos, sin, _ in capture.inputs:
        q, k, _ = (tensor.detach() for tensor in module.project(x, cos, sin))
        maps = 2 if mode == "diff" else 1  # diff: two maps per head, from its two query and key halves
        q, k = q.view(B, T, -1, maps, 8), k.view(B, T, -1, maps, 8)
        group = q.shape[2] // k.shape[2]
        for b, h, c, i in itertools.product(range(B), range(q.shape[2]), range(maps), range(T)):
            for j in range(max(0, i - 4), i + 1):  # a window of 5 keys, itself included
                brute_force_logits.append(abs(float(q[b, i, h, c] @ k[b, j, h // group, c])) / 8 ** 0.5)
    brute_force_logits.sort(reverse=True)
    found = stats["outliers"]["attention_logits"]
    for rank in (1, 2, 3, 10, 100):
        assert found[f"top{rank}"] == pytest.approx(brute_force_logits[rank - 1], rel=1e-9)
    assert found["median"] == pytest.approx(sorted(brute_force_logits)[(len(brute_force_logits) - 1) // 2], rel=1e-9)
    hidden = sorted((abs(v) for output in capture.outputs for v in output.flatten().tolist()), reverse=True)
    assert stats["outliers"]["hidden_states"]["top1"] == hidden[0]


def test_outlier_statistics_find_the_planted_activations() -> None:
    from moe_diff.diagnostics.attention import outlier_stats

    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(50, 40, generator=generator), torch.randn(7, 301, generator=generator)]
    planted = [-900.0, 800.0, 700.0, -650.0, 600.0, 550.0, 500.0, 450.0, -400.0, 350.0]  # top-1 ... top-10
    values[1].view(-1)[torch.randperm(values[1].numel(), generator=generator)[:10]] = torch.tensor(planted)
    everything = sorted((abs(v) for value in values for v in value.flatten().tolist()), reverse=True)
    found = outlier_stats(values)
    assert [found["top1"], found["top2"], found["top3"], found["top10"]] == [900.0, 800.0, 700.0, 350.0]
    assert found["top100"] == everything[99] and found["median"] == sorted(everything)[(len(everything) - 1) // 2]


def test_attention_report_with_a_compared_checkpoint(run, tmp_path: Path) -> None:
    stats = diagnose_quietly(run["root"] / "model", tmp_path, run, compare=run["root"] / "permuted", attention=True,
                             needle_lengths=[78, 128])
    assert len(stats["attention"]["layers"]) == len(stats["attention_compare"]["layers"]) == 2
    assert list(stats["attention"]["needle"]) == list(stats["attention_compare"]["needle"]) == ["78", "128"]
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Attention</h2>" in page and "attention_maps.png" in page
    assert page.count("<td>128</td>") == 2  # a row per model and length
    longest = stats["attention"]["needle"]["128"]["context_lines"]
    assert longest > stats["attention"]["needle"]["78"]["context_lines"] == 2
    with pytest.raises(ConfigError, match=r"--needle-lengths 100000 is not allowed: context lengths from 78 \(two "
                                          r"lines around the needle\) to the model's max_seq_len \(\d+\) tokens"):
        diagnose_quietly(run["root"] / "model", tmp_path, run, attention=True, needle_lengths=[100000])
    assert (tmp_path / "attention_maps.png").read_bytes()[:4] == b"\x89PNG"


def test_needle_probe_scores_the_planted_value() -> None:
    import random

    import torch.nn.functional as F

    from moe_diff.data import ByteTokenizer
    from moe_diff.diagnostics.needle import DEPTHS, haystack, needle_probe, value_log_likelihood

    torch.manual_seed(0)
    model = MoEDiffTransformer(ModelConfig(vocab_size=257, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                           ffn_dim=16, n_experts=4, top_k=2, max_seq_len=256))
    tokenizer = ByteTokenizer()
    context, key, value, others = haystack(random.Random(0), n_lines=6, depth=0.5)
    lines = context.splitlines()
    assert lines[3] == f"key {key}: value {value}" and lines[-1] == f"key {key}: value " and value not in others
    tokens = torch.tensor(list(tokenizer.encode(context + value)))[None]
    log_probs = F.log_softmax(model(tokens[:, :-1]).logits, -1)[0]
    start = len(tokenizer.encode(context))
    expected = sum(log_probs[start - 1 + i, tokens[0, start + i]].item() for i in range(len(value)))
    assert value_log_likelihood(model, tokenizer, context, value) == pytest.approx(expected, abs=1e-4)
    result = needle_probe(model, tokenizer, context_tokens=256, trials=2)
    assert [d["depth"] for d in result["depths"]] == list(DEPTHS) and result["chance"] == 0.2
    assert all(0 <= d["accuracy"] <= 1 and d["value_log_likelihood"] < 0 for d in result["depths"])
    assert result == needle_probe(model, tokenizer, context_tokens=256, trials=2)  # seeded


@pytest.mark.parametrize("length", [78, 1024, 4400, 16384])
def test_a_needle_context_is_the_longest_that_its_length_holds(length: int) -> None:
    import random

    from moe_diff.data import ByteTokenizer
    from moe_diff.diagnostics.needle import context_lines, fitted_haystack, haystack, read_tokens

    tokenizer = ByteTokenizer()
    context, key, value, others = fitted_haystack(random.Random(1), tokenizer, length, depth=0.5)
    lines = context.splitlines()[:-1]
    keys = [line.split()[1].rstrip(":") for line in lines]
    assert len(lines) == context_lines(length, tokenizer) + 1 and len(set(keys)) == len(keys)  # past 200 lines too
    assert key in keys and f"key {key}: value {value}" in lines and len(others) == len(lines) - 1
    assert read_tokens(tokenizer, context, [value, *others]) <= length
    longer = haystack(random.Random(1), len(lines), depth=0.5)  # one line more reads too much
    assert read_tokens(tokenizer, longer[0], [longer[2], *longer[3]]) > length


def test_needle_lengths_too_short_for_a_haystack_are_refused() -> None:
    from moe_diff.data import ByteTokenizer
    from moe_diff.diagnostics.needle import check_needle_lengths

    check_needle_lengths([78, 256], 256, ByteTokenizer())
    with pytest.raises(ConfigError, match=r"--needle-lengths 77 is not allowed: context lengths from 78"):
        check_needle_lengths([128, 77], 256, ByteTokenizer())
    with pytest.raises(ConfigError, match=r"max_seq_len \(64\) holds no haystack \(at least 78 tokens\)"):
        check_needle_lengths([64], 64, ByteTokenizer())


def test_a_needle_context_fits_its_length_with_a_subword_tokenizer(tmp_path: Path, monkeypatch) -> None:
    """BPE merges digits and key letters unevenly: the haystack is drawn again with fewer lines until it fits."""
    import random

    tokenizers = pytest.importorskip("tokenizers")
    from moe_diff.data.tokenizers import HFTokenizer
    from moe_diff.diagnostics import needle
    from moe_diff.diagnostics.needle import check_needle_lengths, fitted_haystack, read_tokens, shortest_context

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    bpe.train_from_iterator([f"key {rng.choice('bdfk')}a{rng.choice('lnr')}: value {rng.randrange(10**4)}"
                             for _ in range(2000)], trainer)
    bpe.save(str(tmp_path / "tok.json"))
    tokenizer = HFTokenizer(str(tmp_path / "tok.json"))
    drawn, haystack = [], needle.haystack
    monkeypatch.setattr(needle, "haystack", lambda rng, n_lines, depth: drawn.append(n_lines)
                        or haystack(rng, n_lines, depth))
    for length, seed in [(300, 0), (1000, 1), (3000, 2)]:
        context, _, value, others = fitted_haystack(random.Random(seed), tokenizer, length, depth=0.3)
        assert length * 0.9 < read_tokens(tokenizer, context, [value, *others]) <= length
    assert len(drawn) > 3  # the first estimate read too much
    shortest = shortest_context(tokenizer)  # the shortest accepted length holds a haystack whatever is drawn
    for seed in range(20):
        context, _, value, others = fitted_haystack(random.Random(seed), tokenizer, shortest, depth=0.5)
        assert read_tokens(tokenizer, context, [value, *others]) <= shortest
    with pytest.raises(ConfigError, match=f"--needle-lengths {shortest - 1} is not allowed"):
        check_needle_lengths([shortest - 1], 4096, tokenizer)


def test_capacity_drops_are_counted_in_the_routing_statistics() -> None:
    torch.manual_seed(0)
    model = MoEDiffTransformer(ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=16,
                                           n_experts=4, top_k=2, capacity_factor=0.5, max_seq_len=16))
    tokens = torch.randint(0, 32, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    batch = Batch(tokens, tokens, positions, torch.zeros_like(tokens))
    trace = collect_trace(model, [(batch, torch.zeros_like(tokens))], ["doc"], {"model": vars(model.cfg)})
    out = model(tokens, positions, torch.zeros_like(tokens))
    capacity = routing_stats(trace)["capacity"]
    assert capacity["mode"] == "capacity factor 0.5"
    assert capacity["dropped_assignments"] == sum(int(r.dropped) for r in out.routings) >= 2 * 32
    for layer, routing in zip(routing_stats(trace)["layers"], out.routings, strict=True):  # drops not counted
        assert layer["counts"] == routing.counts.tolist()
        assert layer["share"] == pytest.approx((routing.counts / routing.counts.sum()).tolist())
