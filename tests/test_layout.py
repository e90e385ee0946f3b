"""The package's import contract: each part imports only parts below it, and the jobs never import each other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "moe_diff"

# Bottom to top. A part may import the parts of lower levels; the parts of one level are independent of each other.
LEVELS = [
    {"errors"},
    {"config"},
    {"device", "files", "plotting", "kernels", "host_reads"},  # leaf operations, facts about the machine
    {"model"},
    {"costs", "data"},
    {"parallel"},  # applied to a finished model from outside
    {"runs"},
    {"hf"},  # the model as a transformers model (transformers imported only by its modules that need it)
    {"checkpoint", "routing", "vllm"},  # what the jobs share; the model as a vLLM model (vllm imported inside)
    {"training", "inference", "diagnostics"},  # the jobs
    {"train", "info"},  # commands that combine jobs
    {"study"},  # many training jobs and their measurements
    {"cli", "__init__"},
]
LEVEL = {part: level for level, parts in enumerate(LEVELS) for part in parts}


def part_of(module: str) -> str:
    """'moe_diff.checkpoint.open' -> 'checkpoint'; the package itself -> '__init__'."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "moe_diff"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moe_diff":
            if node.module == "moe_diff":  # from moe_diff import costs: the names are modules
                found += [(node.lineno, f"moe_diff.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def own_part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 or path.name != "__init__.py" \
        else "__init__"


def test_every_module_belongs_to_a_level() -> None:
    parts = {own_part(path) for path in PACKAGE.rglob("*.py")}
    assert parts <= set(LEVEL), f"parts with no level: {sorted(parts - set(LEVEL))}"


def test_imports_point_down_and_never_sideways() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = own_part(path)
        for line, module in imported_modules(path):
            theirs = part_of(module)
            if theirs != mine and LEVEL[theirs] >= LEVEL[mine]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({mine}) imports {module} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_contract_catches_an_upward_import(tmp_path: Path) -> None:
    """The walk sees the import forms the package uses."""
    module = tmp_path / "example.py"
    module.write_text("from moe_diff import cli, costs\nimport moe_diff.train\n"
                      "from moe_diff.inference.bench import x\n")
    assert [part_of(name) for _, name in imported_modules(module)] == ["cli", "costs", "train", "inference"]
