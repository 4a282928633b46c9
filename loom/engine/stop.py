"""Stop rules, with TGI's priority: max_new_tokens (`length`) → EOS (`eos_token`) → stop sequence."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from loom.tokenizer import IncrementalDetokenizer

# TGI trims the text buffer it matches stop sequences against to its last 200 characters once it passes 300.
_BUFFER_MAX, _BUFFER_KEEP = 300, 200


@dataclass(slots=True)
class StopChecker:
    """Matches stop sequences as suffixes of the text generated so far (the stop text stays in the output)."""

    stop: tuple[str, ...]
    detokenizer: IncrementalDetokenizer
    text: str = ""

    @classmethod
    def create(cls, stop: list[str], tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> StopChecker | None:
        if not stop:
            return None
        return cls(tuple(stop), IncrementalDetokenizer.for_prompt(tokenizer, prompt_ids))

    def push(self, token_id: int) -> bool:
        """Feed one generated id; True when the text now ends with a stop sequence."""
        self.text += self.detokenizer.push(token_id)
        if len(self.text) > _BUFFER_MAX:
            self.text = self.text[-_BUFFER_KEEP:]
        return any(self.text.endswith(s) for s in self.stop)
