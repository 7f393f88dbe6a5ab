"""The package layout: stages import only lower stages, and the serving path loads no plotting or ML-fitting libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import repedit

PACKAGE = Path(repedit.__file__).parent

# Lower to higher. The data flows pairs -> capture -> probes -> steering -> export/serve; in imports, capture
# sits below pairs because making pairs reads hidden states (near-duplicate filter, representative items).
# `report` is above everything it draws; `pipeline` and `cli` wire the stages together.
STAGE_ORDER = ["io", "kernels", "model", "capture", "pairs", "probes", "steering", "evaluate", "store", "scale", "serve", "report", "pipeline", "cli"]


def _stage_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_stages(path: Path, source: str | None = None) -> set[tuple[str, int]]:
    """``{(stage, line)}`` of every repedit stage the module at ``path`` imports, lazy (in-function) imports included."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import is resolved against (also right for __init__)
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.add((target[0], node.lineno))
            else:  # `from . import a, b` at the package root
                found.update((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "repedit" and "." in node.module:
            found.add((node.module.split(".")[1], node.lineno))
        elif isinstance(node, ast.Import):
            found.update((alias.name.split(".")[1], node.lineno) for alias in node.names if alias.name.startswith("repedit."))
    return found


def test_every_module_belongs_to_a_known_stage():
    stages = {_stage_of(path) for path in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert stages == set(STAGE_ORDER), "a new stage must be placed in STAGE_ORDER (and the README's Layout)"


def test_no_stage_imports_a_higher_stage():
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        stage = _stage_of(path)
        if stage in ("__init__", "__main__"):  # the root re-exports a curated API; `python -m repedit` runs the CLI
            continue
        for target, line in _imported_stages(path):
            if target in rank and rank[target] > rank[stage]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({stage}) imports {target}")
    assert not violations, "\n".join(violations)


def test_stage_order_check_catches_upward_imports():
    """The checker itself: lazy relative imports and absolute imports of higher stages are found, with their lines."""
    source = "import repedit.serve.app\ndef f():\n    from ..report.plots import x\n    from . import sites\n    return x\n"
    assert _imported_stages(PACKAGE / "model" / "hooks.py", source) == {("serve", 1), ("report", 3), ("model", 4)}


@pytest.mark.parametrize("module", ["repedit.serve", "repedit.steering", "repedit.store", "repedit.kernels", "repedit"])
def test_light_paths_load_no_plotting_or_fitting_libraries(module):
    """Serving and applying edits must not pay for plotly, scikit-learn, scipy or pandas (fresh interpreter)."""
    heavy = ("plotly", "sklearn", "scipy", "pandas")
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "", f"import {module} loaded {result.stdout.strip()}"


def test_the_report_stage_is_the_only_one_importing_plotly():
    users = sorted(
        str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
        if _stage_of(path) != "report" and any(
            (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "plotly" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").split(".")[0] == "plotly")
            for n in ast.walk(ast.parse(path.read_text())))
    )
    assert users == []


def test_the_command_line_parser_loads_no_plotting_or_fitting_libraries():
    """`repedit --help` builds every command's parser: it must not import the report stage or scikit-learn."""
    code = ("import sys; from repedit.cli.main import build_parser; build_parser(); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'plotly', 'sklearn', 'scipy', 'pandas'})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""
