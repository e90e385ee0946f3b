"""Run by the gradient tests, in one process or under torchrun: for each attention mode, the training job's trainer
(built from the test config in float64, with the given overrides) takes its first step's gradients, and this rank
writes each parameter's piece of them, with the piece's offset in the whole tensor, then the records of a few
whole steps (loss, router losses, gradient norm), to OUT/rank-R.pt; with them, the expert table of the freshly
initialised model, what the table becomes when the last rank changes one element of its experts, and the SHA-256
table of earlier versions.

usage: python gradient_probe.py OUT CORPUS STEPS [section.key=value ...] (with model.attention=MODE, that mode only)"""

import sys
from pathlib import Path

import torch
from harness import CONFIGS, SETTINGS  # tests/parallel is on the path
from rich.console import Console

from moe_diff.checkpoint.experts import expert_table, expert_weights, legacy_sha256_table
from moe_diff.checkpoint.schema import CheckpointError
from moe_diff.config import load_config
from moe_diff.parallel import runtime
from moe_diff.parallel.pieces import local_tensor, piece
from moe_diff.training.trainer import Trainer

MODES = ("standard", "diff", "diff_v2")
RECORDED = ("loss", "aux_loss", "load_balance_loss", "z_loss", "grad_norm")


def pieces(trainer: Trainer) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """name -> (offset in the whole tensor, this rank's piece of its gradient)."""
    found = {}
    for name, param in trainer.model.named_parameters():
        offset, local, _ = piece(param.grad.detach())
        found[name] = (offset, local.clone())
    return found


def perturbed_table(trainer: Trainer) -> dict[str, str] | str:
    """The expert table with the first element of the last rank's piece of layer 0's w2 changed, or the error
    where another rank holds the same piece."""
    weight = local_tensor(expert_weights(trainer.model.layers[0])["w2"]).view(-1)
    last = trainer.runtime.rank == trainer.runtime.world_size - 1
    kept = weight[0].clone()
    with torch.no_grad():
        if last:
            weight[0].add_(1)
        try:
            return expert_table(trainer.model, trainer.runtime)
        except CheckpointError as error:
            return str(error)
        finally:
            weight[0].copy_(kept)


def probed_modes(overrides: list[str]) -> list[str]:
    """The attention mode the overrides name (model.attention=MODE), or every mode."""
    return [o.split("=", 1)[1] for o in overrides if o.startswith("model.attention=")] or list(MODES)


def main(out: Path, corpus: str, steps: int, overrides: list[str]) -> None:
    torch.set_default_dtype(torch.float64)
    console = Console(quiet=True)
    job = None
    written: dict[str, dict] = {}
    for mode in probed_modes(overrides):
        cfg = load_config(CONFIGS / "tiny.yaml", [*SETTINGS, f"data.source={corpus}", f"model.attention={mode}",
                                                  f"train.out_dir={out / mode}", "train.sample_tokens=0",
                                                  *overrides])
        job = job or runtime.start(cfg.parallel, torch.device("cpu"))
        trainer = Trainer(cfg, console, job)
        tables = {"experts": expert_table(trainer.model, job), "perturbed": perturbed_table(trainer),
                  "sha256": legacy_sha256_table(trainer.model, job)}
        records = []
        for step in range(steps):
            sums = trainer.compute_gradients(details=False)  # as a step that does not log: compiled, where asked
            if step == 0:
                gradients = pieces(trainer)
            records.append({key: value for key, value in trainer.update(sums, details=True).items()
                            if key in RECORDED})
            trainer.step += 1
        written[mode] = {"gradients": gradients, "records": records, **tables}
    torch.save(written, out / f"rank-{job.rank}.pt")
    job.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:])
