"""Every parallel layout, in every attention mode (the compiled ones but DDP's in one each), takes the gradients of one
process on the same global batch (train.grad_accum=1, router losses on): each rank's piece of every parameter's
first-step gradient equals that part of one process's, and the losses and gradient norms of the following steps are
one process's. Float64, so that no rounding difference flips a top-k choice. The expert table each layout computes
from its pieces is one process's, and one changed element changes it in one expert, or is refused where the piece has
replicas."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gradient_probe import probed_modes  # tests/parallel is on the path
from harness import corpus, run_script

PROBE = Path(__file__).with_name("gradient_probe.py")
STEPS = 3
TOLERANCE = 1e-9  # per tensor, |piece - one process's| / |one process's whole gradient|, in float64


def probe(out: Path, text: str, processes: int, *overrides: str) -> list[dict]:
    """Every rank's file of gradient_probe.py, training on the corpus at `text`."""
    out.mkdir()
    run_script(PROBE, processes, str(out), text, str(STEPS), *overrides)
    return [torch.load(out / f"rank-{rank}.pt", weights_only=False) for rank in range(processes)]


def assert_same_gradients(ranks: list[dict], single: dict, replicated_experts: bool, modes: set[str]) -> None:
    for rank, written in enumerate(ranks):
        assert set(written) == modes, f"rank {rank} wrote {sorted(written)}"
        for mode, got in written.items():  # every mode, or the one a layout names
            expected = single[mode]
            assert got["experts"] == expected["experts"], f"rank {rank}, {mode}: the expert table"
            assert got["sha256"] == expected["sha256"], f"rank {rank}, {mode}: the earlier versions' table"
            if replicated_experts:
                assert "the replicas of an expert diverged" in got["perturbed"]
            else:
                changed = [key for key, value in got["experts"].items() if got["perturbed"][key] != value]
                assert len(changed) == 1, f"rank {rank}, {mode}: {changed}"
            for name, (_, whole) in expected["gradients"].items():
                offset, piece = got["gradients"][name]
                part = whole[tuple(slice(start, start + size) for start, size in zip(offset, piece.shape,
                                                                                         strict=True))]
                error = (piece - part).norm() / whole.norm()
                assert error <= TOLERANCE, f"rank {rank}, {mode}, {name}: |Δ|/|g| = {error:.2e}"
            for step, (record, reference) in enumerate(zip(got["records"], expected["records"], strict=True)):
                assert record == pytest.approx(reference, rel=TOLERANCE, abs=1e-12), f"rank {rank}, {mode}, step {step}"


# Each layout composes several dimensions, and every dimension alone (DDP, FSDP, ep, tp) is part of several:
# a plain one would prove nothing they do not, and each costs CI a job.
# Compiling is most of a compiled layout's time: DDP's runs every mode, the others one each.
LAYOUTS = {
    # against one eager process: checkpointed blocks compiled, then DDP or FSDP2 (torchtitan's order)
    "ddp2-compiled": (2, ["parallel.data_parallel=ddp", "train.compile=true", "train.activation_checkpointing=block"]),
    "fsdp2-compiled": (2, ["parallel.data_parallel=fsdp", "train.compile=true", "train.activation_checkpointing=moe",
                           "model.attention=diff_v2"]),
    "ddp-ep2-accum2": (2, ["parallel.data_parallel=ddp", "parallel.ep=2", "train.grad_accum=2"]),
    "tp2-vocab": (2, ["parallel.tp=2", "parallel.vocab_parallel=true", "model.n_kv_heads=4",
                      "model.tie_embeddings=true", "train.activation_checkpointing=true"]),
    "tp2-sp-compiled": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "model.n_kv_heads=4",
                            "train.compile=true", "train.activation_checkpointing=moe", "model.attention=standard"]),
    "tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2", "model.n_kv_heads=4"]),
    "fsdp-tp2-ep2-vocab-sp": (4, ["parallel.data_parallel=fsdp", "parallel.tp=2", "parallel.ep=2",
                                  "parallel.vocab_parallel=true", "parallel.sequence_parallel=true",
                                  "model.n_kv_heads=4"]),
    # HSDP with ep=2 in 8 processes: the other parameters sharded within 2 groups of 4 and replicated over them,
    # each expert shard sharded over 2 ranks of its group and replicated over the 2 groups
    "hsdp-ep2-8": (8, ["parallel.data_parallel=fsdp", "parallel.dp_replicate=2", "parallel.ep=2",
                       "train.batch_size=8"]),
    # context parallelism over 32 positions: window 8, blocks of 16 and the 7 keys before each (compiled blocks whose
    # checkpointed forward runs again in the backward, exchange included); window 16, chunks of 4 (r and 2cp-1-r) and
    # the 15 keys before each, from several ranks; no window, every earlier key
    "cp2-compiled": (2, ["parallel.cp=2", "model.sliding_window=8", "train.compile=true",
                         "train.activation_checkpointing=block", "model.attention=diff"]),
    "cp4": (4, ["parallel.cp=4"]),
    "cp4-no-window": (4, ["parallel.cp=4", "model.sliding_window=null"]),
    "cp2-tp2-sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "model.n_kv_heads=4"]),
    "fsdp-cp2-ep2": (4, ["parallel.data_parallel=fsdp", "parallel.cp=2", "parallel.ep=2"]),
    # each rank balancing its own tokens: one process balancing each of as many micro-batches (the old rule)
    "ep2-each-rank": (2, ["parallel.ep=2", "train.load_balance_over=each_rank"], ["train.grad_accum=2"]),
}


REPLICATED_EXPERTS = {"ddp2-compiled", "hsdp-ep2-8",  # pieces two ranks hold
                      "cp2-compiled", "cp4", "cp4-no-window", "cp2-tp2-sp"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the corpus every probe trains on, and of their outputs."""
    return tmp_path_factory.mktemp("gradients")


@pytest.fixture(scope="module")
def one_process(shared: Path) -> Callable[[tuple[str, ...]], dict]:
    """One process's probe for a set of overrides, run once for every layout that compares against it."""
    probes: dict[tuple[str, ...], dict] = {}

    def single(overrides: tuple[str, ...]) -> dict:
        if overrides not in probes:
            (probes[overrides],) = probe(shared / f"single-{len(probes)}", corpus(shared), 1, *overrides)
        return probes[overrides]

    return single


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_takes_the_gradients_of_one_process(layout: str, shared: Path,
                                                   one_process: Callable[[tuple[str, ...]], dict]) -> None:
    processes, overrides, *single_overrides = LAYOUTS[layout]
    same = [setting for setting in overrides if setting.startswith(("model.", "train.grad_accum=", "train.batch_size="))
            and not setting.startswith("model.attention=")]  # one process runs every mode
    single = one_process((*same, *(single_overrides[0] if single_overrides else [])))
    assert_same_gradients(probe(shared / layout, corpus(shared), processes, *overrides), single,
                          layout in REPLICATED_EXPERTS, set(probed_modes(overrides)))
