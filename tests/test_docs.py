"""The README and docs/ stay true to the command line: every `moe-diff ...` command line they show parses, and
every config override they pass names a real field."""

import re
import shlex
from pathlib import Path

import pytest

from moe_diff.cli import parse_arguments
from moe_diff.config import Config, _field_names

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIELDS = set(_field_names(Config))


def commands(text: str) -> list[str]:
    """The command lines of a page's code blocks that run moe-diff (directly, or the training job through
    `python -m moe_diff.train` or torchrun); comments and line continuations removed, spaces collapsed."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        found += [" ".join(line.split(" #")[0].split()) for line in lines]
    return [line for line in found if re.match(r"(moe-diff|torchrun|python -m moe_diff\.train) ", line)]


def arguments(line: str) -> list[str]:
    """The arguments after `moe-diff` (or the training config and overrides after `-m moe_diff.train`), without
    a `...` that stands for more of them."""
    words = [word for word in shlex.split(line) if word != "..."]
    if words[0] == "moe-diff":
        return words[1:]
    return ["train", *words[words.index("moe_diff.train") + 1:]]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_command_shown_parses(page: Path) -> None:
    shown = commands(page.read_text())
    for line in shown:
        args = arguments(line)
        try:
            parsed = parse_arguments(args)
        except SystemExit:
            pytest.fail(f"{page.name}: `{line}` is not accepted by the parser")
        for override in getattr(parsed, "overrides", []):
            assert "=" in override and override.split("=")[0] in FIELDS, f"{page.name}: `{line}`: {override}"


def test_the_pages_show_commands() -> None:
    """The extraction finds what it should, so the test above cannot pass by finding nothing."""
    assert len(commands((ROOT / "README.md").read_text())) >= 10
    assert commands("```bash\nmoe-diff info x.yaml  # comment\ntorchrun --nproc_per_node=2 \\\n  -m moe_diff.train "
                    "c.yaml\n```\nnot `moe-diff bench`") == ["moe-diff info x.yaml",
                                                           "torchrun --nproc_per_node=2 -m moe_diff.train c.yaml"]
