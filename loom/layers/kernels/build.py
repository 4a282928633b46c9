"""Builds Loom's small C++ CPU kernels with torch's extension loader, once per machine.

The kernels are compiled with `-march=native`, so a build is only valid on the CPU that made it: the extension
name carries a digest of this CPU's feature flags, and a cache directory shared between machines (a mounted
TORCH_EXTENSIONS_DIR, a container image built elsewhere) never hands one CPU another's binary.
LOOM_DISABLE_CPU_KERNELS=1 turns every kernel off (the torch paths are used instead).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from functools import cache
from types import ModuleType

logger = logging.getLogger(__name__)

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


def load_kernel(name: str, source: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType | None:
    """The compiled module `name` (built on first use, then loaded from torch's extension cache), or None when it
    cannot be built here: no compiler, no headers, or LOOM_DISABLE_CPU_KERNELS=1."""
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
            except Exception as err:  # noqa: BLE001 — no compiler, no headers: the torch path is used
                logger.warning("CPU kernel %s unavailable (%s); using the torch path", name, err)
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
