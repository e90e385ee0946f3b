"""lm-evaluation-harness scores an exported model on the local next-line task, by loglikelihood and by generation,
through `trust_remote_code` (lm_eval never imports moe_diff itself), as `moe-diff eval` scores the checkpoint
in its own process."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_diff.cli import main
from moe_diff.errors import UsageError
from moe_diff.hf.eval_task import TASKS, questions, write_task
from moe_diff.inference.evaluate import check_tasks
from tests.hf.test_export import checkpoint, export_hf


def test_questions_come_from_held_out_files_with_the_answer_among_distinct_choices() -> None:
    found = questions(30)
    assert len(found) == 30
    for question in found:
        assert len(set(question["choices"])) == 4 and question["choices"][question["answer"]] == question["target"]
        assert question["context"].endswith("\n") and question["context"].count("\n") == 4


@pytest.mark.skipif(shutil.which("lm_eval") is None, reason="lm-evaluation-harness is not installed")
def test_lm_eval_scores_an_export_as_moe_diff_eval_scores_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    source = checkpoint(tmp_path, "diff_v2", sliding_window=16, max_seq_len=512)
    export_hf(source, tmp_path / "model")
    write_task(tmp_path / "task", n_questions=8)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(["lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={tmp_path / 'model'},trust_remote_code=True", "--tasks", ",".join(TASKS),
                          "--include_path", str(tmp_path / "task"), "--device", "cpu", "--batch_size", "4",
                          "--output_path", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert 0 <= results["stdlib_next_line"]["acc,none"] <= 1
    assert results["stdlib_next_line_gen"]["exact_match,none"] == 0  # random weights never write the line

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["eval", str(source), "--tokenizer", "byte", "--tasks", *TASKS, "--limit", "8", "--batch-size", "4",
                 "--out", str(tmp_path / "ours.json")]) == 0  # in this process, from the checkpoint, no export
    ours = json.loads((tmp_path / "ours.json").read_text())["results"]
    assert ours["stdlib_next_line"]["acc,none"] == results["stdlib_next_line"]["acc,none"]
    assert ours["stdlib_next_line_gen"]["exact_match,none"] == 0


def test_moe_diff_eval_names_what_it_cannot_use(tmp_path: Path, capsys) -> None:
    source = checkpoint(tmp_path, "diff")
    assert main(["eval", str(source), "--tasks", TASKS[0]]) == 2
    assert "--tokenizer byte" in capsys.readouterr().err  # a bare checkpoint has no data config
    assert main(["eval", str(source), "--tokenizer", "byte", "--tasks", TASKS[0], "--include-path",
                 str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(UsageError, match="did you mean stdlib_next_line"):
        check_tasks(["stdlib_next_lin"], [*TASKS, "hellaswag"])
