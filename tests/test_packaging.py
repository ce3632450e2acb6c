"""Packaging: every built-in plugin folder is a listed package with an entry point of its name,
and the core reaches plugins only through entry points."""

from __future__ import annotations

import importlib
import re
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PLUGIN_DIRS = sorted(p.parent.name for p in (REPO / "plugins").glob("*/__init__.py"))
EPS = PYPROJECT["project"]["entry-points"]["tampu.plugins"]


def test_there_are_plugins():
    assert {"auth", "localusers", "relay", "loopdetect"} <= set(PLUGIN_DIRS)


@pytest.mark.parametrize("name", PLUGIN_DIRS)
def test_plugin_folder_is_packaged_with_an_entry_point(name):
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    assert f"tampu.plugins.{name}" in packages, f"add tampu.plugins.{name} to packages"
    assert name in EPS, f'add {name} = "tampu.plugins.{name}:Class" to the entry points'
    module, _, attr = EPS[name].partition(":")
    assert module == f"tampu.plugins.{name}" and attr, EPS[name]
    obj = getattr(importlib.import_module(module), attr)
    settings = getattr(obj, "Settings", None)
    assert settings is not None, f"{EPS[name]} has no Settings model"
    undocumented = [f for f, info in settings.model_fields.items() if not info.description]
    assert not undocumented, f"{name}: fields without description= {undocumented}"


def test_every_entry_point_is_a_folder_and_installed():
    assert sorted(EPS) == PLUGIN_DIRS
    installed = {ep.name: ep.value for ep in entry_points(group="tampu.plugins")
                 if ep.dist is not None and ep.dist.metadata["Name"] == "tampu"}
    stale = {n: v for n, v in EPS.items() if installed.get(n) != v}
    assert not stale, ("pyproject.toml and the installed metadata differ; run "
                       "pip install -e '.[dev]' --config-settings editable_mode=strict")


def test_packages_listed_exist():
    dirs = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        prefix = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len)
        rest = package[len(prefix):].lstrip(".").replace(".", "/")
        assert (REPO / dirs[prefix] / rest / "__init__.py").exists(), package


IMPORT = re.compile(r"^\s*(?:from|import)\s+(tampu\.plugins|plugins)\b", re.M)


def test_core_never_imports_plugins():
    """Nor does the test kit (core/testing/): an author's tests get no built-in for free."""
    offenders = []
    for path in sorted((REPO / "core").rglob("*.py")):
        for match in IMPORT.finditer(path.read_text()):
            line = path.read_text()[: match.start()].count("\n") + 1
            offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert not offenders, f"the core imports plugins directly: {offenders}"


def test_the_server_modules_do_not_pull_in_plugins():
    import subprocess
    import sys

    code = ("import sys; import tampu.server, tampu.cli, tampu.smtp, tampu.intake, "
            "tampu.store_files, tampu.delivery, tampu.registry; "
            "print(sorted(m for m in sys.modules if m.startswith('tampu.plugins.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def test_the_server_modules_leave_the_libraries_of_rare_paths_unloaded():
    """Memory: aiosmtpd (its PROXY parser, with attrs and atpublic), cryptography (DKIM keys,
    DANE, the self-signed certificate) and httpx (MTA-STS) are imported when first used."""
    import subprocess
    import sys

    code = ("import sys; import tampu.server, tampu.cli, tampu.smtp, tampu.intake, "
            "tampu.store_files, tampu.delivery, tampu.registry, tampu.workers; "
            "print(sorted(m for m in ('aiosmtpd', 'attr', 'public', 'cryptography', 'httpx') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    """Every ``tampu.X`` module a core module imports, TYPE_CHECKING blocks included."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tampu" and len(parts) >= 2 and parts[1] != "plugins":
                found.add(parts[1])
    return found


def test_the_core_has_no_import_cycles():
    """Not even behind TYPE_CHECKING: each module depends only on modules below it."""
    core = REPO / "core"
    graph = {p.stem: _imports(p) & {q.stem for q in core.glob("*.py")}
             for p in core.glob("*.py") if p.stem not in ("__init__", "testing")}
    for node in graph:
        graph[node].discard(node)
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state = seen.get(node)
        if state == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, node]))
        if state == 2:
            return
        seen[node] = 1
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*path, node])
        seen[node] = 2

    for node in sorted(graph):
        visit(node, [])
