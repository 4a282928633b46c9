"""The CPU kernels' sources (csrc/) and what a failed build does: a warning and the torch path by default, an error
with LOOM_REQUIRE_KERNELS=1 (CI), so a kernel that stops compiling cannot pass unnoticed."""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path

import pytest

from loom.layers.kernels import build

KERNELS = Path(build.__file__).parent
BROKEN = "#include <torch/extension.h>\nthis is not C++\n"


def test_every_source_belongs_to_one_kernel_and_is_spliced_whole():
    uses: dict[str, list[str]] = {}
    for module in KERNELS.glob("*.py"):
        for file in re.findall(r'kernel_source\("([^"]+)"\)', module.read_text()):
            uses.setdefault(file, []).append(module.name)
    sources = sorted(p.name for p in build.CSRC.glob("*.cpp"))
    assert sources and sorted(uses) == sources
    assert all(len(modules) == 1 for modules in uses.values()), uses
    local = {p.name for p in build.CSRC.iterdir()}
    for file in sources:
        text = build.kernel_source(file)
        assert not [h for h in re.findall(r'^\s*#\s*include\s*"([^"]+)"', text, re.M) if h in local], file
    assert "exp512" in build.kernel_source("fused_cpu.cpp")  # simd_math.h's text, spliced in


@pytest.fixture
def isolated_build(monkeypatch, tmp_path):
    monkeypatch.delenv("LOOM_DISABLE_CPU_KERNELS", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the broken builds' directories go with the test
    monkeypatch.setattr(build, "_built", {})


def test_a_failed_build_is_an_error_when_kernels_are_required(monkeypatch, isolated_build):
    monkeypatch.setenv("LOOM_REQUIRE_KERNELS", "1")
    name = f"loom_test_broken_{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match=name) as err:
        build.load_kernel(name, BROKEN)
    assert "error" in str(err.value)  # the compiler's message comes along


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, isolated_build, caplog):
    monkeypatch.delenv("LOOM_REQUIRE_KERNELS", raising=False)
    name = f"loom_test_broken_{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger=build.logger.name):
        assert build.load_kernel(name, BROKEN) is None
        assert build.load_kernel(name, BROKEN) is None  # remembered: not rebuilt, not warned again
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "using the torch path" in warnings[0]
    assert "error" in warnings[0]


def test_disabled_kernels_stay_silent_even_when_required(monkeypatch, isolated_build):
    monkeypatch.setenv("LOOM_DISABLE_CPU_KERNELS", "1")
    monkeypatch.setenv("LOOM_REQUIRE_KERNELS", "1")
    assert build.load_kernel(f"loom_test_broken_{uuid.uuid4().hex[:8]}", BROKEN) is None
