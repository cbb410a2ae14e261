"""The package's shape is a rule, checked here: the data flow reads as the folder order
``data/ -> model/ -> train/ -> cv/ -> tune/ -> report/`` with ``demo``, ``submit`` and the CLI on top;
nothing imports a layer above its own; Ray is imported only by ``data/prepare.py``, ``cv/``, ``tune/`` and
``submit.py``; and ruff, with its default excludes, sees and passes every Python file of the tree."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fers_dist"

# Layer of each top-level name under fers_dist (a package or a module). The shared helpers sit at the bottom.
LAYERS = {name: 0 for name in ("__init__", "errors", "io", "config", "paths", "results", "storage", "provenance", "tracking",
                                "cpustat", "plotting")}
LAYERS.update(data=1, model=2, train=3, cv=4, tune=5, report=6, demo=7, submit=7, bench=7, length_bench=7, cli=7)
RAY_HOMES = ("fers_dist.data.prepare", "fers_dist.cv", "fers_dist.tune", "fers_dist.submit")
SIDEWAYS = {"report": ("cv", "tune")}  # lower, yet not needed: the report reads Parquet and checkpoints


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        raise AssertionError(f"{module}: no layer assigned; add it to LAYERS in {Path(__file__).name}")
    return LAYERS[key]


def _is_module(name: str) -> bool:
    return (PKG / name).is_dir() or (PKG / f"{name}.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; use fers_dist.… absolute imports"
            base = node.module or ""
            # `from fers_dist import submit` names a module (`from fers_dist import __version__` the package
            # itself); `from fers_dist.x import f` names the module x
            found += [(node.lineno, f"{base}.{a.name}" if base == "fers_dist" and _is_module(a.name) else base)
                      for a in node.names]
    return found


SOURCES = sorted(PKG.rglob("*.py"))


def test_every_module_has_a_layer_and_the_old_dist_package_is_gone():
    assert not (PKG / "dist").exists()
    for p in SOURCES:
        layer(module_name(p))
    for pkg in ("cv", "tune"):  # each Ray package says what it is and where Ray lives
        doc = ast.get_docstring(ast.parse((PKG / pkg / "__init__.py").read_text()))
        assert doc and "Ray" in doc and "prepare.py" in doc, pkg


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path):
    me = module_name(path)
    above = [f"{path.relative_to(ROOT)}:{line} imports {mod} (layer {layer(mod)} > {layer(me)})"
             for line, mod in imports(path) if mod.startswith("fers_dist.") and layer(mod) > layer(me)]
    assert not above, "\n".join(above)
    banned = tuple(f"fers_dist.{b}" for b in SIDEWAYS.get(me.split(".")[1] if "." in me else "", ()))
    sideways = [f"{path.relative_to(ROOT)}:{line} imports {mod}" for line, mod in imports(path)
                if banned and mod.startswith(banned)]
    assert not sideways, "\n".join(sideways)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_ray_layer_imports_ray(path):
    me = module_name(path)
    if me.startswith(RAY_HOMES):
        return
    bad = [f"{path.relative_to(ROOT)}:{line} imports {mod}" for line, mod in imports(path)
           if mod == "ray" or mod.startswith("ray.")]
    assert not bad, "\n".join(bad)


def test_the_plain_pytorch_core_loads_without_ray():
    """At run time too: the model, readers, single-fold trainer, Table V protocol and report pull in no
    Ray, whatever they import in turn."""
    code = ("import sys, fers_dist.model, fers_dist.data.loader, fers_dist.train.fold, fers_dist.train.fes_eval, "
            "fers_dist.report.cli, fers_dist.tune.search_space; "
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
            "assert not bad, bad[:5]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert exe, "ruff is not installed: it is in the test extras (pip install -e '.[test]')"
    return [exe]


def test_ruff_sees_every_python_file_of_the_tree():
    """A folder that linters skip by name (``dist/``, ``build/``) would drop out of this list."""
    out = subprocess.run([*_ruff(), "check", "--show-files", "."], capture_output=True, text=True, check=False,
                         cwd=ROOT)
    shown = {Path(line.strip()).resolve() for line in out.stdout.splitlines() if line.strip().endswith(".py")}
    tracked = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, check=False, cwd=ROOT)
    files = {ROOT / f for f in tracked.stdout.split()} if tracked.returncode == 0 and tracked.stdout else (
        set(SOURCES) | set((ROOT / "tests").glob("*.py")))
    missing = sorted(str(f.relative_to(ROOT)) for f in files if f.resolve() not in shown)
    assert not missing, f"ruff skips: {missing}"


def test_ruff_check_passes():
    out = subprocess.run([*_ruff(), "check", "--no-cache", "."], capture_output=True, text=True, check=False,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-1000:]
