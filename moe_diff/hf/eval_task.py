"""A local lm-evaluation-harness task that needs no download: next-line prediction on the held-out documents of
the built-in corpus (the standard library's sources the main job does not train on), scored as multiple choice
(loglikelihood: the true next line among four lines of the same file) and as generation (exact match of the
greedy line).

    python -m moe_diff.hf.eval_task DIR        # then:
    lm_eval --model hf --model_args pretrained=EXPORTED,trust_remote_code=True \\
        --tasks stdlib_next_line,stdlib_next_line_gen --include_path DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

from moe_diff.config import DataConfig
from moe_diff.data.corpus import builtin_files, is_validation

TASKS = ("stdlib_next_line", "stdlib_next_line_gen")
CONTEXT_LINES, CHOICES, MAX_LINE = 4, 4, 100  # lines before the answer; choices per question; characters per line


def questions(n_questions: int, seed: int = 0) -> list[dict]:
    """Up to `n_questions` next-line questions, a few from each held-out file in order, each with its context,
    four distinct choices from the same file, the answer's index and the true line."""
    val_fraction = DataConfig().val_fraction
    found: list[dict] = []
    for name, path in builtin_files():
        if len(found) >= n_questions:
            break
        if not is_validation(name, val_fraction):
            continue
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip() and len(line) <= MAX_LINE]
        rng = random.Random(f"{seed}:{name}")
        distinct = sorted(set(lines))
        for index in range(CONTEXT_LINES, len(lines), max(1, len(lines) // 3))[:3]:
            others = [line for line in distinct if line != lines[index]]
            if len(others) < CHOICES - 1:
                break
            choices = [lines[index], *rng.sample(others, CHOICES - 1)]
            rng.shuffle(choices)
            found.append({"context": "\n".join(lines[index - CONTEXT_LINES:index]) + "\n", "choices": choices,
                          "answer": choices.index(lines[index]), "target": lines[index], "source": name})
    return found[:n_questions]


def write_task(directory: Path, n_questions: int = 200) -> list[Path]:
    """The JSONL data and the two task YAMLs (data path absolute, so lm_eval runs from anywhere)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = (directory / "stdlib_next_line.jsonl").resolve()
    data.write_text("".join(json.dumps(question) + "\n" for question in questions(n_questions)))
    shared = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "{{context}}", "target_delimiter": ""}  # the context ends with its newline
    tasks = {
        "stdlib_next_line": {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                             "doc_to_target": "{{answer}}",
                             "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        "stdlib_next_line_gen": {"output_type": "generate_until", "doc_to_target": "{{target}}",
                                 "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_LINE, "do_sample": False},
                                 "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                  "higher_is_better": True}]},
    }
    written = [data]
    for task, fields in tasks.items():
        written.append(directory / f"{task}.yaml")
        written[-1].write_text(yaml.safe_dump({"task": task, **shared, **fields}, sort_keys=False))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="where to write the task (give it to lm_eval --include_path)")
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    for path in write_task(args.directory, args.questions):
        print(path)


if __name__ == "__main__":
    main()
