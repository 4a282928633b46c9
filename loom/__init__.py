"""Loom: a text-generation inference server compatible with Hugging Face TGI.

The offline API (`LLM`, `SamplingParams`, ...) is imported on first use, so that `import loom` (and the router
process, which imports `loom.router`) does not load the model stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "GenerationResult", "GrammarSpec", "SamplingParams", "__version__"]

_LAZY = {
    "LLM": "loom.llm",
    "GenerationResult": "loom.llm",
    "GrammarSpec": "loom.grammar",
    "SamplingParams": "loom.sampling_params",
}

if TYPE_CHECKING:
    from loom.grammar import GrammarSpec
    from loom.llm import LLM, GenerationResult
    from loom.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loom' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
