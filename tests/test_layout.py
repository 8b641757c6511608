"""The code's shape: scripts -> scratch_detector -> core modules (dataset.py, gradcam.py); nothing imports a
script; no circle of imports; `python train.py --help` loads neither the run's storage, the review page nor Ray."""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

SCRIPTS = {"train", "infer", "evaluate"}
CORE = {"dataset", "gradcam"}


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, object]:
    files = [ROOT / f"{name}.py" for name in SCRIPTS | CORE] + sorted((ROOT / "scratch_detector").rglob("*.py"))
    return {module_name(path): path for path in files}


def imports_of(name: str, path, known: set[str]) -> set[str]:
    """The project modules `name` imports, at any level of its code (top level, or inside a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known}
    found.discard(name)
    return found


def test_no_module_imports_a_script_and_core_modules_import_only_runtime():
    modules = project_modules()
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    for name, imported in graph.items():
        assert not imported & SCRIPTS, f"{name} imports the script(s) {imported & SCRIPTS}"
    for name in CORE:
        assert graph[name] <= {"scratch_detector", "scratch_detector.runtime"}, (name, graph[name])


def test_no_circle_of_imports():
    modules = project_modules()
    graph = {name: imports_of(name, path, set(modules)) - {"scratch_detector"} for name, path in modules.items()}
    done, path = set(), []

    def visit(name: str) -> None:
        assert name not in path, "import circle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)
    for name in sorted(graph):
        visit(name)


def test_train_help_loads_no_run_machinery():
    probe = ("import runpy, sys; sys.argv = ['train.py', '--help']\n"
             "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray' or m in ("
             "'scratch_detector.storage', 'scratch_detector.review', 'scratch_detector.inference', "
             "'scratch_detector.engines')), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
