"""Structured output: grammars (JSON schema, regex) that constrain generation token by token.

`spec` is the request-side description (validated in the router, carried to the engine in `SamplingParams`);
`guide` is the engine side: one llguidance matcher per constrained request and the per-step token masks.
"""

from loom.grammar.spec import GrammarError, GrammarSpec

__all__ = ["GrammarError", "GrammarSpec"]
