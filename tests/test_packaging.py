"""repguard installs like a library: the wheel carries the shipped neuron maps, builds without deprecation
warnings, and its commands work from a fresh venv with no repository in sight.

The fresh venv reuses this environment's dependencies (torch, transformers, the embedded model packages)
through a path file, so nothing is downloaded; repguard itself comes only from the wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real_model]

ROOT = Path(__file__).resolve().parent.parent
MAPS = sorted(p.name for p in (ROOT / "neuron_maps").glob("*.safetensors"))


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The wheel, built from a copy of what the sdist would hold (pyproject, README, the package, the maps)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("repguard", "neuron_maps"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp / "dist"),
               str(src)], cwd=tmp, env=env, timeout=300)
    wheels = list((tmp / "dist").glob("repguard-*.whl"))
    assert len(wheels) == 1, out.stdout[-2000:]
    return tmp, wheels[0], out.stdout + out.stderr


def test_wheel_carries_maps_and_every_package(built):
    _, wheel, log = built
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in MAPS:
        assert f"repguard/neuron_maps/{name}" in names, f"{name} is not in the wheel"
    # every package of the source tree is listed in pyproject.toml (tool.setuptools.packages), so none is left out
    source = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "repguard").rglob("__init__.py")}
    missing = sorted(p for p in source if f"{p.replace('.', '/')}/__init__.py" not in names)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert not re.search(r"deprecat", log, re.I), "the build prints a deprecation warning:\n" + "\n".join(
        line for line in log.splitlines() if re.search(r"deprecat", line, re.I))


def test_pyproject_licence_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


def test_installed_wheel_runs_generate_and_serve_check_outside_the_repository(built):
    tmp, wheel, _ = built
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=dict(os.environ))
    site = next((venv / "lib").glob("python3*/site-packages"))
    # this environment's dependencies, read-only; its own (editable) repguard is not loaded from there,
    # since a path file's folders are not scanned for further path files
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "repguard-test-deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REPGUARD_MAP_PATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
         "--no-build-isolation", str(wheel)], cwd=tmp, env=env)
    away = tmp / "elsewhere"
    away.mkdir()
    py = str(venv / "bin" / "python")
    where = json.loads(run([py, "-c", "import json, repguard, repguard.maps as m; print(json.dumps("
                            "[repguard.__file__, [str(d) for d in m.map_dirs()]]))"], cwd=away, env=env).stdout)
    assert where[0].startswith(str(site)), f"repguard came from {where[0]}, not the installed wheel"
    assert where[1] == [str(site / "repguard" / "neuron_maps")], where[1]
    assert str(ROOT) not in json.dumps(where)

    repguard = str(venv / "bin" / "repguard")
    out = run([repguard, "generate", "--model", "smollm2-135m", "--max-new-tokens", "8", "--prompt", "Hi",
               "--threads", "2"], cwd=away, env=env, timeout=180)
    assert out.stdout.strip(), "generate printed nothing"
    check = json.loads(run([repguard, "serve", "--check"], cwd=away, env=env).stdout)
    assert check["model"] == "smollm2-135m" and check["neuron_map"] is None  # the shipped map was found
