"""The layers follow the data flow (../shared/ARCHITECTURE.md): trainable/ -> spaces/ -> planning/ (no Ray)
-> search/ (Ray) beside analysis/ (no Ray) -> report/ and the CLIs. An import only ever points down, and the
read side and planning/ import without Ray."""
from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

# package -> the packages of this project it may import
ALLOWED = {
    "trainable": {"trainable"},
    "spaces": {"trainable", "spaces"},
    "analysis": {"trainable", "spaces", "analysis"},
    "planning": {"trainable", "spaces", "analysis", "planning"},
    "search": {"trainable", "spaces", "analysis", "planning", "search"},
    "report": {"trainable", "spaces", "analysis", "report"},
}
OURS = set(ALLOWED) | {"benchmarks", "tests"}


def _imports(path) -> set[str]:
    """The top-level project packages a file imports (at module level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & OURS


def test_imports_point_down_the_layers():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).glob("*.py")):
            bad = _imports(path) - allowed
            if bad:
                wrong.append(f"{path.relative_to(REPO)} imports {', '.join(sorted(bad))}")
    assert not wrong, "\n".join(wrong)


def test_the_read_side_imports_without_ray():
    """analyze.py, predict.py, app.py, the report, the analysis layer and planning/: no Ray on import."""
    code = ("import sys; import analyze, predict, app, report.build, analysis.experiment, analysis.final, "
            "analysis.baselines, analysis.outcome, planning.settings, planning.precheck, planning.estimate, "
            "planning.plan, planning.incumbent, planning.define; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'search'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
