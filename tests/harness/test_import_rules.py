"""Import rules: the host never loads torch; the device side loads none of the host's stack."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runs import TINY_PLAN

REPO = Path(__file__).resolve().parents[2]
HOST_STACK = ("torch", "pandas", "seaborn", "fabric", "paramiko", "rich", "yaml", "serial")


def loaded_after(imports: str) -> set[str]:
    """Top-level modules present after `imports`, in a fresh interpreter."""
    code = (
        f"import sys\n{imports}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "imports",
    [
        "import harness.cli; harness.cli.build_parser()",
        "import harness.runner, harness.store, harness.plan, harness.local, harness.clock",
        "import harness.commands.run, harness.commands.data, harness.commands.export",
        "import contract.events, contract.jobspec, contract.vocabulary",
    ],
)
def test_host_side_does_not_import_torch(imports):
    assert "torch" not in loaded_after(imports)


def test_device_protocol_and_agent_cli_import_nothing_of_the_host():
    loaded = loaded_after("import contract.events, device_agent.cli, device_agent.job")
    assert not loaded & set(HOST_STACK), loaded & set(HOST_STACK)


def test_data_prepare_works_where_torch_cannot_be_imported(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "data",
            "prepare",
            "digits",
            "--out",
            str(tmp_path),
            "--format",
            "json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{blocker}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "digits.npz").is_file()


# ---------------------------------------------------------------- file-level import graph

PACKAGES = ("contract", "runstore", "datafiles", "trainers", "device_agent", "analysis",
            "harness", "inventory")
# Package -> the packages it may import: the one-way arrows of docs/DEVELOPMENT.md.
ALLOWED = {
    "contract": set(),
    "runstore": set(),
    "datafiles": {"contract"},
    "trainers": {"contract", "datafiles"},
    "device_agent": {"contract", "trainers"},
    "analysis": {"contract", "runstore"},
    "harness": {"contract", "runstore", "datafiles", "analysis"},
    "inventory": set(),
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (inside functions too), not `if TYPE_CHECKING:` ones."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the repository modules it imports (a submodule named in `from P import m`
    counts as that submodule, otherwise the package's `__init__`)."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {known(alias.name) for alias in node.names}
                continue
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level
                                      + (path.name == "__init__.py")]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                deps.add(full if full in modules else known(base))
        graph[name] = deps - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_each_other_one_way_only():
    arrows = {(a.split(".")[0], b.split(".")[0]) for a, deps in import_graph().items()
              for b in deps if a.split(".")[0] != b.split(".")[0]}
    forbidden = sorted((a, b) for a, b in arrows if b not in ALLOWED[a])
    assert forbidden == []
    package_graph = {p: {b for a, b in arrows if a == p} for p in PACKAGES}
    assert cycles(package_graph) == []


def test_a_whole_run_report_and_export_never_load_torch_in_the_host(tmp_path):
    """The host process of `harness run` (this machine as the device), `report` and `export`:
    the agent trains in its own process; the host loads neither torch nor the engine."""
    (tmp_path / "plan.yaml").write_text(TINY_PLAN)
    code = (
        "import json, sys\n"
        "from harness.cli import main\n"
        "codes = [main(['run', '--plan', 'plan.yaml', '--run-id', 'r']),\n"
        "         main(['report', 'runs/r', '--no-model']),\n"
        "         main(['export', 'runs/r', '--format', 'csv'])]\n"
        "engine = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainers'))\n"
        "print(json.dumps({'codes': codes, 'engine': engine}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0], out.stderr[-3000:]
    assert result["engine"] == []
