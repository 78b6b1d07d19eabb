"""The core imports no framework: each core module, imported alone in a fresh interpreter, leaves transformers,
vLLM, FastAPI and repguard's framework packages out of ``sys.modules``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p.stem for p in (ROOT / "repguard").glob("*.py") if p.stem != "cli")
FORBIDDEN = ("transformers", "vllm", "fastapi", "starlette", "uvicorn", "repguard.hf", "repguard.vllm",
             "repguard.serve")


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_framework(module):
    name = "repguard" if module == "__init__" else f"repguard.{module}"
    code = (f"import sys, {name}\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith({FORBIDDEN!r}))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{name} pulls in {out.stdout.strip()}"


def test_the_core_list_holds_the_rollback_policy():
    assert {"rollback", "request_guard", "policy", "detect", "config"} <= set(CORE)


# -- import cycles ----------------------------------------------------------------------------------------
import ast  # noqa: E402

PACKAGE = ROOT / "repguard"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(module: str, everywhere: bool) -> set[str]:
    """repguard modules that ``module`` imports: at module level only (what runs at import time), or
    ``everywhere`` (function bodies too). ``if TYPE_CHECKING:`` blocks never count."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("repguard"))
            elif isinstance(node, ast.ImportFrom):
                target = node.module if node.level == 0 else _resolve(module, is_package, node.level, node.module)
                if target and target.startswith("repguard"):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not everywhere:
                continue
            visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return {m for m in found if m in MODULES and m != module}


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles, state = [], {}

    def walk(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    return cycles


def test_no_import_cycles_between_repguard_modules():
    """Module-level imports between repguard's modules and subpackages form no cycle (a package's own
    parents are imported by Python first, and are not counted as edges)."""
    graph = {m: _imports(m, everywhere=False) - _parents(m) for m in MODULES}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_cycle_check_sees_relative_and_parent_imports():
    # what the check above relies on: cycles are found, relative imports resolve, function-level imports
    # are told apart
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert "repguard.runtime" in _imports("repguard.hf.guard", everywhere=False)
    assert "repguard.metrics" in _imports("repguard.hf.guard", everywhere=False)  # from .. import metrics
    assert "repguard.vllm.engine" in _imports("repguard.vllm.plugin", everywhere=True)
    assert "repguard.vllm.engine" not in _imports("repguard.vllm.plugin", everywhere=False)


def test_the_vllm_engine_guard_and_the_logits_processor_do_not_import_each_other():
    """They meet in ``repguard.vllm.worker``, the process's one guard slot: neither imports the other, not
    even in a function body."""
    assert "repguard.vllm.logits" not in _imports("repguard.vllm.engine", everywhere=True)
    assert "repguard.vllm.engine" not in _imports("repguard.vllm.logits", everywhere=True)
    assert "repguard.vllm.worker" in _imports("repguard.vllm.logits", everywhere=False)
