"""Loom: a text-generation inference server compatible with Hugging Face TGI."""

from loom.grammar import GrammarSpec
from loom.llm import LLM, GenerationResult
from loom.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "GenerationResult", "GrammarSpec", "SamplingParams", "__version__"]
