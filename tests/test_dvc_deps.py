"""dvc.yaml knows what each stage runs: every project module a stage imports is one of its deps.

A stage's code is its `molar <name>` command module (stages/<name>.py) plus every project module
it imports, transitively, including the imports inside functions (stages import torch-heavy
modules lazily, inside their commands). The `stages` package __init__ is excepted: it is the CLI
that imports every stage module, not code a stage runs. The stages are read the way DVC resolves
dvc.yaml (foreach/templating included), through DVC's own API.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

from dvc_project import dvc_stages  # tests/dvc_project.py

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("molar", "stages")  # the project's top-level packages
EXCEPTED = {Path("stages/__init__.py")}


def _module_file(root: Path, dotted: str) -> Path | None:
    """The file (relative to ``root``) that defines module ``dotted``, or None if it is not a module."""
    base = Path(*dotted.split("."))
    for rel in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / rel).is_file():
            return rel
    return None


def _runs_no_code(tree: ast.Module) -> bool:
    """Only a docstring and literal constants (``__version__ = "0.1.0"``): nothing it does can
    change a stage's result."""
    return all(
        isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Constant) for node in tree.body
    )


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Dotted names of every module an import in ``tree`` may execute (absolute), anywhere in it."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from the importing module's package
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(filter(None, [*parts, base]))
            # `from a.b import c` runs a.b and, when c is a submodule, a.b.c
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))  # parents run first
    return names


def project_imports(root: Path, start: Path) -> dict[Path, Path]:
    """Every project module file ``start`` (a path relative to ``root``) runs, transitively, mapped
    to the file that first imports it (``start`` maps to itself). Only modules of ``PACKAGES`` count."""
    seen = {start: start}
    todo = [start]
    while todo:
        rel = todo.pop()
        tree = ast.parse((root / rel).read_text(), filename=str(rel))
        parts = rel.with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        for name in sorted(_imported_names(tree, module, is_package)):
            if name.split(".")[0] not in PACKAGES:
                continue
            found = _module_file(root, name)
            if found is None or found in seen or found in EXCEPTED:
                continue
            seen[found] = rel
            todo.append(found)
    return {
        rel: via
        for rel, via in seen.items()
        if rel == start or not _runs_no_code(ast.parse((root / rel).read_text()))
    }


def uncovered(imports: dict[Path, Path], deps: list[str]) -> list[tuple[Path, Path]]:
    """(file, imported by) pairs no dep covers; a dep directory covers the files under it."""
    dep_paths = [Path(d) for d in deps]
    return [
        (rel, via)
        for rel, via in sorted(imports.items())
        if not any(rel == dep or dep in rel.parents for dep in dep_paths)
    ]


def _stage_modules() -> dict[str, Path]:
    """`molar` subcommand name -> the stage module (relative path) that implements it."""
    import stages

    modules = {}
    for command in stages.app.registered_commands:
        module = command.callback.__module__
        modules[command.name] = Path(*module.split(".")).with_suffix(".py")
    return modules


# ------------------------------------------------------------------------- the walker itself


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_walker_follows_lazy_relative_and_transitive_imports(tmp_path):
    _write(
        tmp_path,
        {
            "molar/__init__.py": '"""pkg"""\n__version__ = "1"\n',
            "molar/a.py": "from molar import b, consts\n",
            "molar/b.py": "def f():\n    from .sub import c  # lazy and relative\n",
            "molar/sub/__init__.py": "import os\nX = os.sep\n",  # runs code: counts
            "molar/sub/c.py": "import numpy\nfrom molar.d import thing\n",
            "molar/d.py": "def thing():\n    return 1\n",
            "molar/consts.py": '"""only constants: no code to depend on"""\nN = 3\n',
            "molar/unused.py": "",
            "stages/__init__.py": "from stages import s\n",
            "stages/s.py": "import molar.a\n",
        },
    )
    imports = project_imports(tmp_path, Path("stages/s.py"))
    assert set(imports) == {Path(p) for p in ("stages/s.py", "molar/a.py", "molar/b.py", "molar/sub/__init__.py", "molar/sub/c.py", "molar/d.py")}
    assert imports[Path("molar/d.py")] == Path("molar/sub/c.py")  # names who imports it
    missing = uncovered(imports, ["stages/s.py", "molar/a.py", "molar/sub"])
    assert missing == [(Path("molar/b.py"), Path("molar/a.py")), (Path("molar/d.py"), Path("molar/sub/c.py"))]
    assert uncovered(imports, ["stages", "molar"]) == []


# ----------------------------------------------------------------------- the real dvc.yaml


def test_every_stage_depends_on_the_code_it_imports():
    modules = _stage_modules()
    problems = []
    checked = 0
    for stage in dvc_stages(REPO):
        argv = shlex.split(stage.cmd)
        assert argv[0] == "molar" and argv[1] in modules, f"{stage.name}: cmd {stage.cmd!r} is not a molar subcommand"
        deps = [dep.def_path for dep in stage.deps]
        for rel, via in uncovered(project_imports(REPO, modules[argv[1]]), deps):
            problems.append(f"{stage.name}: {rel} (imported by {via}) is not covered by its deps")
        checked += 1
    assert checked, "dvc.yaml resolved to no stages"
    assert not problems, "dvc.yaml deps miss code the stages run:\n" + "\n".join(problems)
