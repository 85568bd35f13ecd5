"""CLI start-up stays light: ``wsi-mil --help`` and ``wsi-mil info`` never import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_mil.wsi import make_synthetic_slide

HEAVY = ("torch", "timm", "zarr", "h5py", "dask", "sklearn", "matplotlib")

_RUN = """
import json, sys
from wsi_mil.workflows.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
"""


def _loaded(*argv: str) -> dict:
    """Run the CLI in a fresh interpreter; its exit code and the heavy modules it loaded."""
    out = subprocess.run(
        [sys.executable, "-c", _RUN % (HEAVY,), *argv], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["tile", "--help"]])
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    result = _loaded(*argv)
    assert result == {"code": 0, "loaded": []}


def test_info_imports_no_torch(tmp_path: Path) -> None:
    path = make_synthetic_slide(tmp_path / "s.svs", 1024, 512, mpp=0.5, levels=1).path
    result = _loaded("info", str(path), "--json")
    assert result["code"] == 0
    assert result["loaded"] == []
