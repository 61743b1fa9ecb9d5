"""The harness's floors: imports run one way (benchmarks/README.md, "Layout")."""

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
COMMANDS = sorted(path.stem for path in BENCHMARKS.glob("*.py") if path.stem != "__init__")
# what each floor may import of the harness
ALLOWED = {
    "data": {"data", "storage"},
    "storage": {"storage"},
    "measuring": {"measuring", "storage"},
    "core": {"core", "data", "storage"},
    "report": {"report", "core", "data", "storage"},
}


def harness_imports(path: Path):
    """The harness packages and modules a file imports (``core``, ``report``, ``run``, ...)."""
    package = path.parent.relative_to(BENCHMARKS).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package inside benchmarks/
                base = list(package[: len(package) - (node.level - 1)]) if node.level > 1 else list(package)
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts[0]] if parts else [alias.name for alias in node.names]
            elif node.module and node.module.startswith("benchmarks."):
                names = [node.module.split(".")[1]]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks."))
    return found


def test_no_command_imports_another():
    for command in COMMANDS:
        assert harness_imports(BENCHMARKS / f"{command}.py") & set(COMMANDS) == set(), command


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_each_floor_imports_only_the_floors_below_it(floor):
    for path in sorted((BENCHMARKS / floor).rglob("*.py")):
        assert harness_imports(path) <= ALLOWED[floor], path


def test_the_import_reader_sees_relative_and_absolute_imports(tmp_path):
    assert harness_imports(BENCHMARKS / "core" / "launch.py") >= {"core", "data", "storage"}
    assert harness_imports(BENCHMARKS / "run.py") >= {"core", "report"}
    assert "report" in harness_imports(BENCHMARKS / "report" / "summary.py")
