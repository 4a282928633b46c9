"""The model's tokenizer, its EOS ids, and incremental detokenization (shared by the router and `loom.LLM`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loom.protocol.outputs import FinishReason


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_token_ids(model_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """TGI: the list in `generation_config.json` when there is one, else the tokenizer's (or config's) EOS id."""
    ids: set[int] = set()
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():
        ids |= _as_id_set(json.loads(gen_cfg.read_text()).get("eos_token_id"))
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        cfg = Path(model_dir) / "config.json"
        if cfg.is_file():
            ids |= _as_id_set(json.loads(cfg.read_text()).get("eos_token_id"))
    return frozenset(ids)


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, list):
        return {int(v) for v in value}
    return {int(value)}


@dataclass(slots=True)
class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas, TGI's `decode_token` algorithm.

    `prefix_offset..read_offset` is a small window of already-emitted ids decoded again for context, so that
    tokenizers which merge spaces or bytes across tokens produce the right delta. Text ending in U+FFFD (an
    incomplete UTF-8 sequence) is held back until a later id completes it.

        ids:  [ ....... | prefix_offset ... read_offset | new ids ... ]
                          decoded for context only        emitted delta
    """

    tokenizer: PreTrainedTokenizerBase
    ids: list[int]
    prefix_offset: int
    read_offset: int
    skip_special_tokens: bool = False

    @classmethod
    def for_prompt(
        cls, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], skip_special_tokens: bool = False
    ) -> IncrementalDetokenizer:
        n = len(prompt_ids)
        return cls(tokenizer, list(prompt_ids[-5:]), 0, min(n, 5), skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Append one id; return the text it completes ('' while a multi-byte character is incomplete)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self._trim()
            return delta
        return ""

    def _trim(self) -> None:
        # Only the window from prefix_offset is ever read again; drop the rest so long generations stay O(1).
        if self.prefix_offset > 64:
            cut = self.prefix_offset
            del self.ids[:cut]
            self.prefix_offset -= cut
            self.read_offset -= cut


# TGI trims the text buffer it matches stop sequences against to its last 200 characters once it passes 300.
_STOP_BUFFER_MAX, _STOP_BUFFER_KEEP = 300, 200


@dataclass(slots=True)
class StopSequences:
    """TGI's stop sequences: the text generated so far ends with one of them (the stop text stays in the output).

    Matched where text is made (the router, `loom.LLM`), on the same deltas the client sees; the engine only
    knows token-level stops (length, EOS) and is told to abort the request when a sequence matches. TGI's priority
    holds: a token that also reaches `max_new_tokens` or is EOS finishes with that reason."""

    stop: tuple[str, ...]
    text: str = ""

    def push(self, delta: str) -> bool:
        """Feed one token's text; True when the text now ends with a stop sequence."""
        if not delta:
            return False
        self.text += delta
        if len(self.text) > _STOP_BUFFER_MAX:
            self.text = self.text[-_STOP_BUFFER_KEEP:]
        return any(self.text.endswith(s) for s in self.stop)


@dataclass(slots=True)
class TextStream:
    """One request's generated text as it grows, where text is made (the router, loom.LLM): each token's delta,
    and whether a stop sequence now ends the text."""

    detokenizer: IncrementalDetokenizer
    stops: StopSequences | None

    @classmethod
    def for_request(cls, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: list[str]) -> TextStream:
        return cls(IncrementalDetokenizer.for_prompt(tokenizer, prompt_ids), StopSequences(tuple(stop)) if stop else None)

    def push(self, token_id: int) -> tuple[str, FinishReason | None]:
        """This token's text, and STOP_SEQUENCE when the text now ends with a stop sequence."""
        text = self.detokenizer.push(token_id)
        stopped = self.stops is not None and self.stops.push(text)
        return text, FinishReason.STOP_SEQUENCE if stopped else None


def finish_reason(engine_reason: FinishReason | None, text_reason: FinishReason | None) -> FinishReason | None:
    """TGI's priority on one token: the engine's (length, then EOS) before a stop sequence matched on the text."""
    return engine_reason if engine_reason is not None else text_reason
