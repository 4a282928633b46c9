"""Builds Loom's small C++ CPU kernels with torch's extension loader, once per machine.

The kernels are compiled with `-march=native`, so a build is only valid on the CPU that made it: the extension
name carries a digest of this CPU's feature flags, and a cache directory shared between machines (a mounted
TORCH_EXTENSIONS_DIR, a container image built elsewhere) never hands one CPU another's binary.
LOOM_DISABLE_CPU_KERNELS=1 turns every kernel off (the torch paths are used instead).

Each kernel's C++ source is a file in csrc/ (`<module>.cpp`); kernel_source() reads it as the one text torch
compiles. A kernel that fails to build is a warning and the torch path (a server still starts on a machine without
a compiler), unless LOOM_REQUIRE_KERNELS=1 (CI): then it is an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import threading
import time
from functools import cache
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)".*$', re.M)
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_locks: dict[str, threading.Lock] = {}
_built: dict[str, ModuleType | None] = {}


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_digest() -> str:
    text = platform.machine() + " " + " ".join(sorted(cpu_flags()))
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def kernel_source(file: str) -> str:
    """The C++ source csrc/`file` as one text, each `#include "<file in csrc>"` replaced by that file's text
    (recursively). torch decides when to rebuild from a hash of this text, so editing a header rebuilds the kernels
    that include it. `#line` directives keep compiler messages pointing at the csrc files' own lines."""
    return _spliced(file, ())


def _spliced(file: str, including: tuple[str, ...]) -> str:
    if file in including:
        raise ValueError(f"csrc/{file} includes itself (via {' -> '.join(including)})")
    text = (CSRC / file).read_text()

    def splice(match: re.Match) -> str:
        header = match.group(1)
        if not (CSRC / header).is_file():
            return match.group(0)  # not one of ours: left to the compiler
        body = _spliced(header, (*including, file)).rstrip("\n")
        after = text.count("\n", 0, match.start()) + 2  # the #include's line + 1, numbered from 1
        return f'{body}\n#line {after} "csrc/{file}"'

    return f'#line 1 "csrc/{file}"\n' + _INCLUDE.sub(splice, text)


def _compiler_errors(err: Exception, max_lines: int = 15) -> str:
    """The lines of a failed build's message that say what failed (torch's message carries the compiler's output)."""
    lines = [line.strip()[:300] for line in str(err).splitlines() if line.strip()]
    # torch's first line, "Error building extension '<name>': [1/2] c++ <the whole command line>", says nothing more
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("Error building extension")]
    return "\n".join((errors or lines)[:max_lines]) or repr(err)


def load_kernel(name: str, source: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType | None:
    """The compiled module `name` (built on first use, then loaded from torch's extension cache), or None when it
    cannot be built here (no compiler, no headers, a compile error: logged as a warning) or LOOM_DISABLE_CPU_KERNELS=1.
    With LOOM_REQUIRE_KERNELS=1 a failed build raises RuntimeError instead."""
    if name in _built:
        return _built[name]
    with _lock:
        lock = _locks.setdefault(name, threading.Lock())
    with lock:  # one build per kernel; different kernels may build at once (prebuild)
        if name in _built:
            return _built[name]
        module = None
        if os.environ.get("LOOM_DISABLE_CPU_KERNELS") != "1":
            try:
                from torch.utils.cpp_extension import _get_build_directory, load_inline

                full_name = f"{name}_{_cpu_digest()}"
                cached = os.path.exists(os.path.join(_get_build_directory(full_name, False), f"{full_name}.so"))
                if not cached:  # a first start on this CPU: say why it takes a while
                    logger.info("building CPU kernel %s for this CPU (once; about a minute)", name)
                started = time.monotonic()
                module = load_inline(
                    full_name, cpp_sources=[source], extra_cflags=[*_CFLAGS, *extra_cflags],
                    extra_ldflags=["-fopenmp"], verbose=False,
                )
                if not cached:
                    logger.info("built CPU kernel %s in %.0f s", name, time.monotonic() - started)
            except Exception as err:  # noqa: BLE001 — no compiler, no headers, a compile error
                if os.environ.get("LOOM_REQUIRE_KERNELS") == "1":
                    raise RuntimeError(f"CPU kernel {name} failed to build (LOOM_REQUIRE_KERNELS=1): {err}") from err
                logger.warning("CPU kernel %s failed to build; using the torch path. The build said:\n%s",
                               name, _compiler_errors(err))
        _built[name] = module
        return module


def prebuild() -> None:
    """Build (or load) every CPU kernel now, two compilers at a time, rather than one by one in the first steps:
    each build is a single-threaded compile of about a minute on a new machine, a cache hit afterwards. Only the
    matmul kernel this CPU's dispatch picks is built (layers/linear.py: cpu_bf16_packing)."""
    from concurrent.futures import ThreadPoolExecutor

    from loom.layers.kernels import (fused_cpu, paged_decode_cpu, prefill_attention_cpu, quant_gemm_cpu,
                                     quant_vnni_gemm_cpu)
    from loom.layers.linear import cpu_bf16_packing

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        loads = (paged_decode_cpu.load, cpu_bf16_packing, fused_cpu.load, prefill_attention_cpu.load,
                 quant_gemm_cpu.load, quant_vnni_gemm_cpu.load)
        list(pool.map(lambda load: load(), loads))
