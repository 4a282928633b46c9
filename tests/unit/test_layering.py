"""The package's layering (pyproject.toml's import-linter contracts; docs/architecture.md draws it): protocol/
imports no process's code, the router process never loads the model stack, distributed/ knows no models."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    script = Path(sys.executable).with_name("lint-imports")  # installed with import-linter (the test extra)
    command = str(script) if script.exists() else shutil.which("lint-imports")
    assert command, "import-linter is not installed: pip install -e '.[test]'"
    # --no-cache: a cache left by an earlier run could report a contract kept that the code now breaks
    run = subprocess.run([command, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "BROKEN" not in run.stdout and "KEPT" in run.stdout


def test_router_process_imports_no_model_code():
    """What the router process really loads (lazy imports included): every router module, and `import loom`."""
    code = (
        "import importlib, pkgutil, sys, loom, loom.router\n"
        "for m in pkgutil.iter_modules(loom.router.__path__): importlib.import_module('loom.router.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['loom', p] for p in "
        "('engine', 'worker', 'models', 'layers', 'quantization', 'distributed', 'llm')))\n"
        "print(','.join(bad))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "", f"the router process imported: {run.stdout.strip()}"


def test_offline_api_still_at_the_top_level():
    import loom

    assert loom.LLM.__name__ == "LLM" and loom.SamplingParams.__name__ == "SamplingParams"
    assert {"LLM", "SamplingParams", "GrammarSpec", "GenerationResult"} <= set(loom.__all__)
