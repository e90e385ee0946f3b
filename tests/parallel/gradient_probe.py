"""Run by the gradient tests, in one process or under torchrun: for each attention mode, the training job's trainer
(built from the test config in float64, with the given overrides) takes its first step's gradients, and this rank
writes each parameter's piece of them, with the piece's offset in the whole tensor, then the records of a few
whole steps (loss, router losses, gradient norm), to OUT/rank-R.pt.

usage: python gradient_probe.py OUT CORPUS STEPS [section.key=value ...]"""

import sys
from pathlib import Path

import torch
from harness import CONFIGS, SETTINGS  # tests/parallel is on the path
from rich.console import Console
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe_diff.config import load_config
from moe_diff.parallel import runtime
from moe_diff.parallel.views import CheckpointViews
from moe_diff.training.trainer import Trainer

MODES = ("standard", "diff", "diff_v2")
RECORDED = ("loss", "aux_loss", "load_balance_loss", "z_loss", "grad_norm")


def pieces(trainer: Trainer) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """name -> (offset in the whole tensor, this rank's piece of its gradient)."""
    view = CheckpointViews(trainer.runtime).global_view
    found = {}
    for name, param in trainer.model.named_parameters():
        placed = view(name, param.grad.detach())
        if isinstance(placed, DTensor):
            _, offset = compute_local_shape_and_global_offset(placed.shape, placed.device_mesh, placed.placements)
            found[name] = (tuple(offset), placed.to_local().clone())
        else:
            found[name] = ((0,) * placed.dim(), placed.clone())
    return found


def main(out: Path, corpus: str, steps: int, overrides: list[str]) -> None:
    torch.set_default_dtype(torch.float64)
    console = Console(quiet=True)
    job = None
    written: dict[str, dict] = {}
    for mode in MODES:
        cfg = load_config(CONFIGS / "tiny.yaml", [*SETTINGS, f"data.source={corpus}", f"model.attention={mode}",
                                                  f"train.out_dir={out / mode}", "train.sample_tokens=0",
                                                  *overrides])
        job = job or runtime.start(cfg.parallel, torch.device("cpu"))
        trainer = Trainer(cfg, console, job)
        records = []
        for step in range(steps):
            sums = trainer.compute_gradients(details=True)
            if step == 0:
                gradients = pieces(trainer)
            records.append({key: value for key, value in trainer.update(sums, details=True).items()
                            if key in RECORDED})
            trainer.step += 1
        written[mode] = {"gradients": gradients, "records": records}
    torch.save(written, out / f"rank-{job.rank}.pt")
    job.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:])
