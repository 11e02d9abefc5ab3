"""The installed package: every package folder is listed in pyproject.toml, the flows install as
wsss.pipelines (never as a top-level ``pipelines``), and ``import wsss`` is cheap."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "wsss").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"] == {"wsss.pipelines": "pipelines"} and "pipelines" not in listed


def test_flows_import_as_wsss_pipelines_from_the_repository_folder():
    import wsss.pipelines.standard as standard

    assert Path(standard.__file__).resolve() == ROOT / "pipelines" / "standard.py"


def test_import_wsss_loads_no_torch():
    """No import-time side effects: a notebook's ``import wsss`` does not pull in torch until it is used."""
    code = "import sys, wsss; print('torch' in sys.modules, hasattr(wsss, 'Segmenter'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "False"]
