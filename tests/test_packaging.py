"""Packaging: every run-time import is a declared dependency, and the README's first command
installs the package alone (no extras) before ``sdray demo``."""

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("sdray", "pipelines", "serve")
# what only the test and bench extras install (requests and psutil are Ray's own dependencies)
EXTRA_ONLY = ("pytest", "skimage", "playwright", "img2dataset", "pymilvus", "milvus_lite",
              "qdrant_client", "resvg_py", "pyterrier_pisa")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {_norm(re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0]) for d in deps}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module name -> files importing it (module level or inside functions)."""
    local = set(RUNTIME_PACKAGES) | {"benchmarks", "tests"}
    found: dict[str, set[str]] = {}
    for pkg in RUNTIME_PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_a_declared_dependency():
    declared = _declared()
    dists = md.packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "ray", "scipy", "faiss", "huggingface_hub"} <= set(imports)  # the walk sees them
    undeclared = {}
    for module, files in imports.items():
        names = {_norm(d) for d in dists.get(module, [])}
        if not names & declared:
            undeclared[module] = (sorted(names) or "not installed", sorted(files)[:3])
    assert not undeclared, f"imported at run time but not in [project].dependencies: {undeclared}"


def test_runtime_modules_import_without_the_test_extras():
    """Every module of the run-time packages imports with the test/bench-only packages hidden."""
    code = f"""
import importlib, pkgutil, sys
blocked = {EXTRA_ONLY!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in blocked:
            raise ImportError('test-extra package ' + name)
sys.meta_path.insert(0, Block())
for pkg in {RUNTIME_PACKAGES!r}:
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):
        importlib.import_module(info.name)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_readme_first_command_installs_the_package_alone_then_runs_the_demo():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = next(line for line in readme.splitlines() if "pip install" in line)
    assert "pip install -e . " in first + " " and "sdray demo" in first, first
    assert "[" not in first.split("pip install -e", 1)[1].split("&&")[0], first  # no extras
