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
