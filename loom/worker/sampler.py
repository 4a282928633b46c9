"""Turn one step's logits into next tokens, with TGI's `HeterogeneousNextTokenChooser` semantics.

Pipeline, each stage only for the rows that ask for it ("absent means skip"):
    watermark → penalties (repetition → frequency → presence) → grammar mask
    → warpers (temperature → top_k → top_p → typical_p)
    → choice (argmax, or a seeded exponential-race draw) → logprobs of the processed scores → top-n with ties.

A batch of greedy rows without penalties or top-n costs one argmax and one logsumexp. Sampling rows draw their noise
from their own generator only, so a seed yields the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loom.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None  # not None iff params.is_sampling; owned by the engine, persists across steps
    token_ids: Sequence[int]  # prompt + generated ids so far (for penalties)
    # Speculation: the draft proposed for the position this row chooses. The next row then belongs to the same
    # request (it chooses the position after that draft) and counts only if this row's choice equals the draft:
    # otherwise it draws nothing from the generator.
    draft_id: int | None = None


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # chosen id per row
    logprobs: list[float]  # log_softmax of the processed scores at the chosen id (TGI semantics)
    top_tokens: list[list[tuple[int, float]]]  # per row, best first, ties with the n-th kept; [] when top_n == 0


# ---------------------------------------------------------------------------------------------------------------
# Warpers: each takes the scores of the rows that use it, [M, V], and that warper's value per row, [M, 1], and
# edits the scores in place. Removed tokens get -inf.
# ---------------------------------------------------------------------------------------------------------------


# Below this, logits / temperature can overflow float32 (a logit of 100 at 3e-37): +inf logits, NaN probabilities,
# a choice outside the grammar mask, every token tied in top-n. Such rows take the limit instead.
_TINY_TEMPERATURE = 1e-30


def _temperature(scores: torch.Tensor, temperature: torch.Tensor) -> None:
    tiny = temperature < _TINY_TEMPERATURE  # [M, 1]
    if bool(tiny.any()):
        # the limit of softmax(x / t) as t → 0: the best token(s) of the row keep all the mass
        best = scores.amax(dim=-1, keepdim=True)
        limit = torch.where(scores == best, 0.0, _NEG_INF)
        scores.copy_(torch.where(tiny, limit, scores / temperature))
        return
    scores.div_(temperature)


def _top_k(scores: torch.Tensor, k: torch.Tensor) -> None:
    vocab = scores.shape[-1]
    k = k.long().clamp_(1, vocab)
    # One topk at the batch's largest k, then each row reads its own k-th value (TGI's HeterogeneousTopK).
    kth = torch.topk(scores, int(k.max()), dim=-1).values.gather(1, k - 1)  # [M, 1]
    scores.masked_fill_(scores < kth, _NEG_INF)  # `<`, so ties with the k-th value stay


def _top_p(scores: torch.Tensor, opposite: torch.Tensor) -> None:
    # HF TopPLogitsWarper: ascending sort, drop the low tail whose cumulative mass is <= opposite (1 - top_p),
    # always keep the best token.
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum_probs <= opposite
    remove[:, -1] = False
    scores.masked_fill_(remove.scatter(1, sorted_idx, remove), _NEG_INF)


def _typical_p(scores: torch.Tensor, mass: torch.Tensor) -> None:
    # HF TypicalLogitsWarper (min_tokens_to_keep=1): keep the tokens whose surprisal is closest to the entropy
    # until their mass reaches `mass`.
    normalized = torch.log_softmax(scores, dim=-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted = torch.abs(-normalized - entropy)
    sorted_shifted, sorted_idx = torch.sort(shifted, descending=False)
    cum_probs = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cum_probs < mass).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    # Ascending sort: the first token never exceeds the threshold, so at least one token always stays.
    remove = sorted_shifted > sorted_shifted.gather(1, last_ind.view(-1, 1))
    scores.masked_fill_(remove.scatter(1, sorted_idx, remove), _NEG_INF)


@dataclass(frozen=True, slots=True)
class _Warper:
    value: Callable[[SamplingParams], float | None]  # what `apply` gets for this row; None → the row skips it
    apply: Callable[[torch.Tensor, torch.Tensor], None]


# TGI's order. Warpers only ever touch sampling rows: any active warper makes a row sample (SamplingParams).
_WARPERS: tuple[_Warper, ...] = (
    _Warper(lambda p: p.temperature if p.temperature is not None and p.temperature != 1.0 else None, _temperature),
    _Warper(lambda p: p.top_k if p.top_k else None, _top_k),
    # NOTE: 1 - top_p is taken in Python, before rounding to float32, exactly as HF's TopPLogitsWarper does.
    _Warper(lambda p: 1.0 - p.top_p if p.top_p is not None and p.top_p < 1.0 else None, _top_p),
    _Warper(lambda p: p.typical_p if p.typical_p is not None and p.typical_p < 1.0 else None, _typical_p),
)


def _mask_disallowed(scores: torch.Tensor, allowed: torch.Tensor) -> None:
    scores.masked_fill_(~allowed, _NEG_INF)


def _on_rows(logits: torch.Tensor, rows: list[int], fn: Callable[..., None], *args: torch.Tensor) -> None:
    """Apply an in-place row-wise `fn` to `logits[rows]` (`rows` sorted, unique); no copy when it is every row."""
    if len(rows) == logits.shape[0]:
        fn(logits, *args)
        return
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index)
    fn(sub, *args)
    logits.index_copy_(0, index, sub)


# ---------------------------------------------------------------------------------------------------------------
# Watermark
# ---------------------------------------------------------------------------------------------------------------

WATERMARK_HASH_KEY = 15485863  # TGI's: a large prime, times the previous token id, seeds the green list


@dataclass(frozen=True, slots=True)
class Watermark:
    """Kirchenbauer et al.'s green-list watermark with TGI's hashing (utils/watermark.py): the previous token seeds
    a torch generator (`hash_key * previous id`), a random permutation of the vocabulary from it names the green
    list (its first `int(vocab * gamma)` ids), and `delta` is added to their logits. A detector that knows gamma and
    the hashing counts green tokens and tests them against the rate gamma (a z-score)."""

    gamma: float = 0.5  # --watermark-gamma: share of the vocabulary that is green
    delta: float = 2.0  # --watermark-delta: logit bias of green tokens

    def green_ids(self, previous_token: int, vocab_size: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(WATERMARK_HASH_KEY * previous_token)
        return torch.randperm(vocab_size, generator=generator)[: int(vocab_size * self.gamma)]

    def apply(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        vocab = logits.shape[-1]
        for i, row in enumerate(rows):
            if row.params.watermark and len(row.token_ids):
                green = self.green_ids(int(row.token_ids[-1]), vocab).to(logits.device)
                logits[i, green] += self.delta


# ---------------------------------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------------------------------


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition, then frequency, then presence penalty, over each row's prompt + generated ids.

    The ids of all penalised rows become flat keys `row * V + id`; one `unique` yields every (row, id) pair with its
    count, so the three penalties are one gather, elementwise math on the touched entries only, and one scatter.
    """
    n, vocab = logits.shape
    device = logits.device
    keys, rep, freq, pres, length = [], [1.0] * n, [0.0] * n, [0.0] * n, [1.0] * n
    for i, row in enumerate(rows):
        p = row.params
        if not p.uses_penalties or len(row.token_ids) == 0:
            continue
        ids = torch.as_tensor(row.token_ids, dtype=torch.long, device=device)
        # NOTE: an id outside [0, V) would otherwise land in a neighbouring row's logits.
        keys.append(ids[(ids >= 0) & (ids < vocab)] + i * vocab)
        rep[i] = p.repetition_penalty if p.repetition_penalty is not None else 1.0
        freq[i] = p.frequency_penalty or 0.0
        pres[i] = p.presence_penalty or 0.0
        length[i] = float(len(row.token_ids))
    if not keys:
        return
    flat_keys, counts = torch.unique(torch.cat(keys), return_counts=True)
    row_of = flat_keys // vocab

    def per_pair(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=device)[row_of]

    flat = logits.view(-1)
    score = flat[flat_keys]
    rep_t = per_pair(rep)
    score = torch.where(score < 0, score * rep_t, score / rep_t)  # CTRL; a factor of 1 leaves the score exact
    score -= per_pair(freq) * counts.to(logits.dtype) / per_pair(length)
    score -= per_pair(pres)
    flat[flat_keys] = score


# ---------------------------------------------------------------------------------------------------------------
# Choice and outputs
# ---------------------------------------------------------------------------------------------------------------


def _choose(logits: torch.Tensor, rows: Sequence[SamplingRow], sampling: list[int]) -> torch.Tensor:
    """Next id per row, [N] int64: argmax for greedy rows, a draw from the row's own generator for sampling rows.
    A sampling row after a draft that its previous row did not choose is never used and draws nothing (its id is
    left as the argmax): the generator then advances exactly as one step per accepted token would."""
    if len(sampling) < logits.shape[0]:
        next_ids = logits.argmax(dim=-1)  # argmax over every row is cheaper than slicing out the greedy ones (TGI)
    else:
        next_ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    unused = set()  # rows after a rejected draft
    for i in sampling:
        if i > 0 and (previous := rows[i - 1]).draft_id is not None:
            if i - 1 in unused or int(next_ids[i - 1]) != previous.draft_id:
                unused.add(i)
                next_ids[i] = logits[i].argmax()
                continue
        generator = rows[i].generator
        if generator is None:
            raise ValueError(f"row {i} samples but has no generator (the engine seeds one from params.seed)")
        probs = torch.softmax(logits[i], dim=-1)
        # argmax(p / Exp(1)) picks i with probability p_i, like multinomial, without its host sync (TGI).
        q = torch.empty_like(probs).exponential_(generator=generator)
        next_ids[i] = probs.div_(q).argmax()
    return next_ids


def _top_tokens(logits: torch.Tensor, lse: torch.Tensor, top_n: list[int]) -> list[list[tuple[int, float]]]:
    """TGI's `batch_top_tokens`: per row, the best `top_n` tokens plus every token tied with the n-th, best first.

    Ranked on the processed scores (same order as their logprobs); -inf tokens are never listed.
    """
    out: list[list[tuple[int, float]]] = [[] for _ in top_n]
    wanted = [i for i, n in enumerate(top_n) if n > 0]
    if not wanted:
        return out
    index = torch.tensor(wanted, device=logits.device)
    scores = logits.index_select(0, index)  # [M, V]
    n = torch.tensor([top_n[i] for i in wanted], device=logits.device).clamp_(max=scores.shape[-1])
    nth = torch.topk(scores, int(n.max()), dim=-1).values.gather(1, (n - 1).unsqueeze(1))  # [M, 1]
    nth[nth == _NEG_INF] = torch.finfo(scores.dtype).min
    counts = (scores >= nth).sum(dim=1)  # n plus the ties with the n-th value
    top = torch.topk(scores, int(counts.max()), dim=-1, sorted=True)
    logprobs = (top.values - lse.index_select(0, index).unsqueeze(1)).tolist()
    ids = top.indices.tolist()
    for j, (i, count) in enumerate(zip(wanted, counts.tolist())):
        out[i] = list(zip(ids[j][:count], logprobs[j][:count]))
    return out


class Sampler:
    """Stateless: per-request state (the generator, the ids so far) arrives with each `SamplingRow`; the server's
    watermark settings are fixed at construction."""

    def __init__(self, watermark: Watermark | None = None):
        self.watermark = watermark or Watermark()

    @staticmethod
    def edits_logits(rows: Sequence[SamplingRow], allowed: tuple[list[int], torch.Tensor] | None) -> bool:
        """Whether a call would change float32 logits in place (a watermark, penalties, a grammar mask, a warper);
        plain greedy rows only read them."""
        return bool(allowed and allowed[0]) or any(
            r.params.watermark or r.params.uses_penalties or r.params.is_sampling for r in rows)

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow],
        allowed: tuple[list[int], torch.Tensor] | None = None,
    ) -> SamplerOutput:
        """logits: [N, V], one row per `SamplingRow`; float32 rows are processed in place. `allowed` = (rows,
        [len(rows), V] bool): the grammar masks of the constrained rows, applied after the penalties (TGI)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(rows)} rows")
        if logits.dtype != torch.float32 or not logits.is_contiguous():
            logits = logits.float().contiguous()  # logprobs need float32; penalties index a flat view
        if any(row.params.watermark for row in rows):
            self.watermark.apply(logits, rows)  # TGI: the first logits processor
        if any(row.params.uses_penalties for row in rows):
            _apply_penalties(logits, rows)
        if allowed is not None and allowed[0]:
            _on_rows(logits, allowed[0], _mask_disallowed, allowed[1].to(logits.device))
        sampling = [i for i, row in enumerate(rows) if row.params.is_sampling]
        for warper in _WARPERS:
            using = [(i, v) for i in sampling if (v := warper.value(rows[i].params)) is not None]
            if using:
                values = torch.tensor([v for _, v in using], dtype=logits.dtype, device=logits.device).unsqueeze(1)
                _on_rows(logits, [i for i, _ in using], warper.apply, values)
        next_ids = _choose(logits, rows, sampling)
        lse = torch.logsumexp(logits, dim=-1)  # [N]; logprob = score - lse, i.e. log_softmax at that id
        chosen = logits.gather(1, next_ids.unsqueeze(1)).squeeze(1) - lse
        top = _top_tokens(logits, lse, [row.params.top_n_tokens for row in rows])
        return SamplerOutput(token_ids=next_ids.tolist(), logprobs=chosen.tolist(), top_tokens=top)
