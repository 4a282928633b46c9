"""The engine side of structured output: one llguidance matcher per constrained request, and the per-step masks
of the tokens each one allows.

llguidance computes a mask in tens of microseconds on a 50k vocabulary, without a per-grammar token-table
compilation; the engine starts the masks of a step in a background thread while the model runs, so they are
ready when the logits are. Requests without a grammar never touch this module.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from loom.grammar.spec import GrammarError, GrammarSpec
from loom.protocol.outputs import failure_message

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse (TGI keeps 32 outlines guides); a new request deep-copies the compiled matcher.
GRAMMAR_CACHE_SIZE = 32


@dataclass(slots=True)
class MaskBatch:
    """One step's grammar masks: `allowed` [rows, vocab_size] bool in matcher order (a matcher's row, then one per
    draft), and the matchers whose masks could not be computed (index → why): their requests fail, the others'
    masks stand."""

    allowed: torch.Tensor
    errors: dict[int, str] = field(default_factory=dict)


class GrammarGuide:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Sequence[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use: ~0.3 s for 50k tokens
        self._compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            n_vocab = max(self.vocab_size, len(self._hf_tokenizer))
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=n_vocab, eos_token=self._eos)
        return self._tokenizer

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `spec`. Raises GrammarError for a grammar llguidance rejects."""
        compiled = self._compiled.get(spec)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.tokenizer, spec.to_llguidance(), log_level=0)
            if compiled.is_error():
                raise GrammarError(compiled.get_error())
            self._compiled[spec] = compiled
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(spec)
        return compiled.deep_copy()

    def masks(self, matchers: Sequence[llguidance.LLMatcher],
              drafts: Sequence[Sequence[int]] | None = None) -> MaskBatch:
        """The tokens each matcher allows next (only EOS once it is complete or in error). With `drafts`
        (speculation), a matcher's row is followed by one row per draft token: what it allows after consuming the
        drafts up to that one (the drafts are consumed, then rolled back). A matcher that raises fails alone."""
        drafts = drafts if drafts is not None else [()] * len(matchers)
        words = (self.tokenizer.vocab_size + 31) // 32
        bits = np.zeros((sum(len(d) + 1 for d in drafts), words), dtype=np.int32)
        row, eos_only, errors = 0, [], {}
        for i, (m, draft) in enumerate(zip(matchers, drafts)):
            try:
                eos_only.extend(self._matcher_rows(m, draft, bits[row : row + len(draft) + 1], row))
            except Exception as err:  # this request's grammar: the others' masks stand
                logger.exception("grammar mask failed")
                errors[i] = failure_message(err)
            row += len(draft) + 1
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size].astype(bool)
        for r in eos_only:
            allowed[r] = False
            allowed[r, [t for t in self._eos if t < self.vocab_size]] = True
        return MaskBatch(torch.from_numpy(allowed), errors)

    @staticmethod
    def _matcher_rows(m: llguidance.LLMatcher, draft: Sequence[int], bits: np.ndarray, first_row: int) -> list[int]:
        """One matcher's rows of `bits` (its own row, then one per draft); the rows that may allow only EOS."""
        m.unsafe_compute_mask_ptr(bits[0].ctypes.data, bits[0].nbytes)
        consumed = 0
        try:
            for token in draft:
                # The scheduler keeps only drafts the grammar accepts (validate_tokens). Should one fail anyway,
                # the rows after it allow only EOS, as the matcher's error state does.
                if m.validate_tokens([token]) != 1:
                    logger.error("grammar rejected draft token %d", token)
                    return list(range(first_row + 1 + consumed, first_row + 1 + len(draft)))
                m.consume_token(token)
                consumed += 1
                m.unsafe_compute_mask_ptr(bits[consumed].ctypes.data, bits[consumed].nbytes)
            return []
        finally:
            if consumed:
                m.rollback(consumed)

    def masks_async(self, matchers: Sequence[llguidance.LLMatcher],
                    drafts: Sequence[Sequence[int]] | None = None) -> Future[MaskBatch]:
        """`masks` in a background thread: the engine starts it before the forward pass and waits after."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-grammar")
        return self._pool.submit(self.masks, list(matchers), drafts)

    @staticmethod
    def advance(matcher: llguidance.LLMatcher, token: int) -> None:
        if not matcher.consume_token(token):
            # Only allowed tokens are sampled, so this is a bug; the matcher's error state allows only EOS next.
            logger.error("grammar rejected sampled token %d: %s", token, matcher.get_error())
