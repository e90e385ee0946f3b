"""Run by test_host_reads.py under torchrun: the training job's trainer (the test config with the given overrides)
takes one step, then this rank writes the reads of tensor values it made in a second step, which does not log, to
OUT/rank-R.json.

usage: python read_probe.py OUT CORPUS [section.key=value ...]"""

import json
import sys
from pathlib import Path

from harness import CONFIGS, SETTINGS  # tests/parallel is on the path
from rich.console import Console

from moe_diff.config import load_config
from moe_diff.host_reads import counting_host_reads
from moe_diff.training.job import training_job


def main(out: Path, corpus: str, overrides: list[str]) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml", [*SETTINGS, f"data.source={corpus}", f"train.out_dir={out / 'run'}",
                                              "train.log_every=100", *overrides])
    with training_job(cfg, Console(quiet=True)) as trainer:
        trainer.train_step(details=False)  # the first step builds what later steps reuse
        with counting_host_reads() as reads:
            trainer.train_step(details=False)
        (out / f"rank-{trainer.runtime.rank}.json").write_text(json.dumps(reads))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
