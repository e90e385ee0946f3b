"""One worker of `moe-diff study --parallel N`: train and measure the run a spec file describes, the console going
to stdout (the study's log for the run); errors as one `error: ...` line and exit status 2.

    python -m moe_diff.study.worker OUT/runs/MODE-seedN/study-spec.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from moe_diff.errors import run_reporting_errors
from moe_diff.study.measure import Measures
from moe_diff.study.plan import PlannedRun
from moe_diff.study.runner import config_from_dict, train_and_measure


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    run = PlannedRun(spec["mode"], spec["seed"], config_from_dict(spec["config"]))
    measures = Measures(**spec["measures"] | {"needle_lengths": tuple(spec["measures"]["needle_lengths"])})
    console = Console(force_terminal=False, width=120)
    return run_reporting_errors(lambda: 0 if train_and_measure(run, measures, console) is not None else 1)


if __name__ == "__main__":
    sys.exit(main())
