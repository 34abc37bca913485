"""The package's layering, read from the source (docs/ARCHITECTURE.md).

Every module has a rank; a module may import modules of its own rank or
lower, never higher. Imports inside functions count too (a function-local
import of the package's own higher layer is a hidden circle), and only
optional heavy third-party packages may be imported inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Rank of each part of the package, bottom first. The longest matching
#: prefix decides a module's rank.
RANKS: dict[str, int] = {
    "loes._exceptions": 0,
    "loes._deps": 0,
    "loes._rng": 0,
    "loes._progress": 0,
    "loes._json": 0,
    "loes._validation": 1,
    "loes._linalg": 1,
    "loes._splits": 1,
    "loes._io": 1,
    "loes._naming": 1,
    "loes._estimate": 1,
    "loes.datasets": 1,
    "loes.augment": 1,
    "loes.stats": 1,
    "loes.store": 1,
    "loes.result": 2,
    "loes.core": 3,
    "loes.estimator": 4,
    "loes.metrics": 4,
    "loes.transfer": 5,
    "loes.layers": 6,
    "loes.selectors": 7,
    "loes.sweep": 7,
    "loes.baselines": 7,
    "loes.hf": 8,
    "loes.evaluate": 9,
    "loes.distributed": 9,
    "loes.report": 10,
    "loes.demo": 11,
    "loes.cli": 12,
    "loes": 13,  # the façade: loes/__init__.py re-exports public names
}

#: Third-party packages that may be imported inside a function (optional extras).
LAZY_OK = {
    "transformers",
    "datasets",
    "safetensors",
    "accelerate",
    "gguf",
    "matplotlib",
    "sklearn",
    "scipy",
    "ray",
    "pandas",
    "PIL",
    "tqdm",
    "huggingface_hub",
    "pyarrow",
    "torchvision",
    "timm",
    "IPython",
    "psutil",
}


def rank_of(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in RANKS:
            return RANKS[prefix]
    raise KeyError(f"module {module} has no rank in tests/test_architecture.py::RANKS")


def module_files(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in (src / "loes").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(
    module: str, source: str, is_pkg: bool, known: set[str]
) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for each import in ``source``."""
    tree = ast.parse(source)
    skip: set[int] = set()
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for b in node.body for n in ast.walk(b))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_pkg)
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for name in names:
            found.append((name, id(node) in local, node.lineno))
    return found


def violations(src: Path = SRC) -> list[str]:
    files = module_files(src)
    known = set(files)
    out: list[str] = []
    for module, path in sorted(files.items()):
        is_pkg = path.name == "__init__.py"
        mine = rank_of(module)
        for name, inside, line in imports_of(
            module, path.read_text(encoding="utf-8"), is_pkg, known
        ):
            top = name.split(".")[0]
            where = f"{path.relative_to(src)}:{line}"
            if top != "loes":
                if inside and top not in LAZY_OK and top not in sys.stdlib_module_names:
                    out.append(f"{where}: function-local import of {name} (not an optional extra)")
                continue
            if inside and module != "loes":
                out.append(f"{where}: function-local import of loes module {name}")
            if name != "loes" and rank_of(name) > mine:
                out.append(f"{where}: {module} (rank {mine}) imports {name} (rank {rank_of(name)})")
    return list(dict.fromkeys(out))


def test_imports_run_one_way():
    found = violations()
    assert not found, "layering violations:\n" + "\n".join(found)


def test_checker_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "loes"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "report.py").write_text("X = 1\n")
    (pkg / "result.py").write_text("def plot():\n    from loes.report import X\n    return X\n")
    (pkg / "core" / "__init__.py").write_text("from loes.result import plot\n")
    found = violations(tmp_path)
    assert any("loes.result (rank 2) imports loes.report (rank 10)" in v for v in found), found
    assert any("function-local import of loes module loes.report" in v for v in found), found
    assert not any("core" in v for v in found), found  # a downward import is fine


def test_no_import_circle():
    tool = SRC.parents[1] / "shared" / "tools" / "import_cycles.py"
    if not tool.exists():
        pytest.skip("shared/tools/import_cycles.py is not beside this checkout")
    run = subprocess.run(
        [sys.executable, str(tool), str(SRC), "loes"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
