"""Sampler: one test per parameter, HF warpers as oracles, seeded reproducibility across batch compositions."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from loom.sampling_params import SamplingParams
from loom.worker.sampler import Sampler, SamplingRow

V = 200


def make_row(params: SamplingParams, token_ids: Sequence[int] = (), seed: int = 0) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if params.is_sampling else None
    return SamplingRow(params=params, generator=generator, token_ids=list(token_ids))


def random_logits(n: int, v: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def processed_logprobs(params: SamplingParams, logits: torch.Tensor, token_ids: Sequence[int] = ()) -> torch.Tensor:
    """The processed distribution of one row as a [V] logprob tensor (-inf where removed), read via top_n = V."""
    params.top_n_tokens = logits.shape[-1]
    out = Sampler()(logits.clone().unsqueeze(0), [make_row(params, token_ids)])
    dense = torch.full((logits.shape[-1],), float("-inf"))
    for token_id, logprob in out.top_tokens[0]:
        dense[token_id] = logprob
    return dense


def kept(logprobs: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logprobs).nonzero().flatten().tolist())


# --- choice and logprobs ---------------------------------------------------------------------------------------


def test_greedy_is_argmax_with_raw_logprob_and_skips_heavy_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = random_logits(5)
    expected = torch.log_softmax(logits, -1)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("greedy rows without penalties must not sort, draw noise or dedupe ids")

    for name in ("sort", "unique", "softmax", "log_softmax", "topk"):
        monkeypatch.setattr(torch, name, forbidden)
    out = Sampler()(logits.clone(), [make_row(SamplingParams(), [1, 2, 3]) for _ in range(5)])
    monkeypatch.undo()

    assert out.token_ids == expected.argmax(-1).tolist()
    want = expected.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
    assert torch.allclose(torch.tensor(out.logprobs), want, atol=1e-6)
    assert out.top_tokens == [[] for _ in range(5)]


def test_chosen_logprob_is_log_softmax_of_processed_scores() -> None:
    logits = random_logits(1)[0]
    params = SamplingParams(temperature=0.7, top_k=5, top_n_tokens=3)
    out = Sampler()(logits.clone().unsqueeze(0), [make_row(params, seed=3)])

    scaled = logits / 0.7
    processed = scaled.masked_fill(scaled < scaled.topk(5).values[-1], float("-inf"))
    expected = torch.log_softmax(processed, -1)
    chosen = out.token_ids[0]
    assert chosen in processed.topk(5).indices.tolist()
    assert out.logprobs[0] == pytest.approx(expected[chosen].item(), abs=1e-5)
    assert out.logprobs[0] > torch.log_softmax(logits, -1)[chosen].item()  # warping concentrated the mass
    assert [t for t, _ in out.top_tokens[0]] == expected.topk(3).indices.tolist()
    assert [lp for _, lp in out.top_tokens[0]] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-5)


def test_do_sample_alone_matches_multinomial_frequencies() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    logits = probs.log().repeat(n, 1)
    rows = [make_row(SamplingParams(do_sample=True), seed=s) for s in range(n)]
    out = Sampler()(logits, rows)

    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03)
    # No warper: the reported logprob is the raw one.
    assert torch.allclose(torch.tensor(out.logprobs), probs.log()[torch.tensor(out.token_ids)], atol=1e-6)


def test_mixed_greedy_and_sampling_batch() -> None:
    logits = random_logits(4, scale=1.0)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.5, top_k=10),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(do_sample=True, top_p=0.8),
    ]
    ids = [5, 6, 7]
    rows = [make_row(p, ids, seed=11) for p in params]
    out = Sampler()(logits.clone(), rows)

    raw = torch.log_softmax(logits, -1)
    assert out.token_ids[0] == int(raw[0].argmax())
    assert out.logprobs[0] == pytest.approx(raw[0].max().item(), abs=1e-6)  # untouched by its neighbours' warpers
    assert out.token_ids[1] in logits[1].topk(10).indices.tolist()
    assert out.logprobs[1] > raw[1, out.token_ids[1]].item()  # temperature 0.5 + top_k sharpened row 1

    # Each row gives what it gives alone.
    for i, p in enumerate(params):
        alone = Sampler()(logits[i : i + 1].clone(), [make_row(p, ids, seed=11)])
        assert alone.token_ids[0] == out.token_ids[i]
        assert alone.logprobs[0] == pytest.approx(out.logprobs[i], abs=1e-6)


def test_sampling_row_without_generator_is_rejected() -> None:
    row = SamplingRow(params=SamplingParams(do_sample=True), generator=None, token_ids=[])
    with pytest.raises(ValueError, match="generator"):
        Sampler()(random_logits(1), [row])
    with pytest.raises(ValueError, match="rows"):
        Sampler()(random_logits(2), [make_row(SamplingParams())])


# --- seeded reproducibility ------------------------------------------------------------------------------------


def _run_steps(compositions: list[SamplingParams], seeds: list[int], steps: list[torch.Tensor], slot: int) -> list[int]:
    """Tokens of row `slot` over several steps, generators persisting across steps as the engine keeps them."""
    rows = [make_row(p, seed=s) for p, s in zip(compositions, seeds)]
    tokens = []
    for step_logits in steps:
        batch = step_logits.repeat(len(rows), 1)  # every row sees the same logits, so only the noise differs
        tokens.append(Sampler()(batch, rows).token_ids[slot])
    return tokens


def test_seeded_rows_are_reproducible_across_batch_compositions() -> None:
    steps = [random_logits(1, v=1000, seed=100 + k, scale=0.5)[0] for k in range(6)]
    target = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95)
    alone = _run_steps([target], [42], steps, slot=0)

    greedy, other = SamplingParams(), SamplingParams(temperature=1.3, top_k=50)
    mixes = [
        ([greedy, target], [0, 42], 1),
        ([other, greedy, target, other], [7, 0, 42, 8], 2),
        ([target, other, other], [42, 9, 10], 0),
    ]
    for params, seeds, slot in mixes:
        assert _run_steps(params, seeds, steps, slot) == alone
    assert len(set(alone)) > 1  # really sampling: a flat distribution yields different ids from step to step
    assert _run_steps([target], [43], steps, slot=0) != alone  # and the seed matters


# --- warpers ---------------------------------------------------------------------------------------------------


def test_temperature_scales_scores_and_lower_t_concentrates_mass() -> None:
    logits = random_logits(1)[0]
    best = int(logits.argmax())
    by_t = {t: processed_logprobs(SamplingParams(temperature=t), logits) for t in (0.5, 1.5)}
    for t, logprobs in by_t.items():
        assert torch.allclose(logprobs, torch.log_softmax(logits / t, -1), atol=1e-5)
    assert by_t[0.5][best] > torch.log_softmax(logits, -1)[best] > by_t[1.5][best]


@pytest.mark.parametrize("t", [1e-39, 1e-44])
def test_a_temperature_too_small_for_float32_takes_the_limit(t: float) -> None:
    """logits / 1e-39 overflows float32 (issue 18's fuzzing: +inf logits chose token 0 outside the grammar mask,
    NaN logprobs, every token tied in top-n). The limit t → 0 instead: the best allowed token, logprob 0."""
    logits = random_logits(2) * 30  # logits of ±100: 100 / 1e-39 > float32's max
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[:, 50:60] = True
    rows = [make_row(SamplingParams(temperature=t, top_n_tokens=1), seed=i) for i in range(2)]
    out = Sampler()(logits.clone(), rows, ([0, 1], allowed))
    for i in range(2):
        best_allowed = 50 + int(logits[i, 50:60].argmax())
        assert out.token_ids[i] == best_allowed
        assert out.logprobs[i] == 0.0
        assert out.top_tokens[i] == [(best_allowed, 0.0)]
    with pytest.raises(ValueError, match="`temperature` must be strictly positive"):
        SamplingParams(temperature=1e-300).validate()  # 0 as TGI's f32: refused as TGI refuses it


def test_top_k_only_ever_yields_the_k_best() -> None:
    logits = random_logits(1, scale=0.3)[0]
    best3 = set(logits.topk(3).indices.tolist())
    params = SamplingParams(top_k=3)
    n = 300
    out = Sampler()(logits.repeat(n, 1), [make_row(params, seed=s) for s in range(n)])
    assert set(out.token_ids) == best3  # all three show up on a flat distribution, nothing else ever does
    assert kept(processed_logprobs(SamplingParams(top_k=3), logits)) == best3


def test_top_k_keeps_ties_with_the_kth_value() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 2.0, 1.0, 0.0])
    assert kept(processed_logprobs(SamplingParams(top_k=3), logits)) == {0, 1, 2, 3}
    assert kept(processed_logprobs(SamplingParams(top_k=100), logits)) == set(range(6))  # k > V keeps all


def test_top_p_keeps_the_smallest_nucleus_and_matches_hf() -> None:
    logits = random_logits(3, scale=1.5)
    top_ps = [0.3, 0.75, 0.95]
    rows = [make_row(SamplingParams(top_p=p, top_n_tokens=V), seed=i) for i, p in enumerate(top_ps)]
    out = Sampler()(logits.clone(), rows)

    for i, p in enumerate(top_ps):
        got = {t for t, _ in out.top_tokens[i]}
        probs, order = torch.softmax(logits[i], -1).sort(descending=True)
        size = int((probs.cumsum(0) < p).sum()) + 1  # smallest prefix whose mass reaches p
        assert got == set(order[:size].tolist())
        oracle = TopPLogitsWarper(top_p=p)(None, logits[i : i + 1].clone())[0]
        assert got == kept(oracle)
        assert out.token_ids[i] in got


def test_top_p_always_keeps_the_best_token() -> None:
    logits = torch.tensor([1.0, 1.0 - 1e-3, 0.5, 0.0])
    assert kept(processed_logprobs(SamplingParams(top_p=0.01), logits)) == {0}


def test_typical_p_matches_hf() -> None:
    logits = random_logits(3, scale=2.0, seed=5)
    masses = [0.2, 0.5, 0.9]
    rows = [make_row(SamplingParams(typical_p=m, top_n_tokens=V), seed=i) for i, m in enumerate(masses)]
    out = Sampler()(logits.clone(), rows)

    for i, mass in enumerate(masses):
        oracle = TypicalLogitsWarper(mass=mass)(None, logits[i : i + 1].clone())[0]
        got = {t for t, _ in out.top_tokens[i]}
        assert got == kept(oracle)
        assert 0 < len(got) < V
        assert out.token_ids[i] in got
        expected = torch.log_softmax(oracle, -1)
        for token_id, logprob in out.top_tokens[i]:
            assert logprob == pytest.approx(expected[token_id].item(), abs=1e-5)


def test_warpers_apply_in_tgi_order() -> None:
    # temperature → top_k → top_p: top_p sees the distribution already cut to the top 4 at T=0.5.
    logits = random_logits(1, seed=9, scale=1.0)[0]
    got = processed_logprobs(SamplingParams(temperature=0.5, top_k=4, top_p=0.6), logits)
    scaled = logits / 0.5
    cut = scaled.masked_fill(scaled < scaled.topk(4).values[-1], float("-inf"))
    oracle = TopPLogitsWarper(top_p=0.6)(None, cut.unsqueeze(0))[0]
    assert kept(got) == kept(oracle)
    assert torch.allclose(got[torch.isfinite(got)], torch.log_softmax(oracle, -1)[torch.isfinite(oracle)], atol=1e-5)


# --- penalties -------------------------------------------------------------------------------------------------


def test_repetition_penalty_matches_hf_and_touches_only_seen_ids() -> None:
    logits = random_logits(1, seed=2)[0]
    ids = [3, 3, 17, 42, 199, 0]
    got = processed_logprobs(SamplingParams(repetition_penalty=1.8), logits, ids)

    oracle = RepetitionPenaltyLogitsProcessor(penalty=1.8)(torch.tensor([ids]), logits.clone().unsqueeze(0))[0]
    assert torch.allclose(got, torch.log_softmax(oracle, -1), atol=1e-5)
    changed = set((oracle != logits).nonzero().flatten().tolist())
    assert changed == set(ids)
    for i in set(ids):  # CTRL: positive scores are divided, negative ones multiplied, both move down
        assert oracle[i] < logits[i]


def test_frequency_penalty_scales_with_counts() -> None:
    logits = random_logits(1, seed=3)[0]
    ids = [7, 7, 7, 9, 11]
    got = processed_logprobs(SamplingParams(frequency_penalty=1.5), logits, ids)
    expected = logits.clone()
    expected[7] -= 1.5 * 3 / 5
    expected[9] -= 1.5 * 1 / 5
    expected[11] -= 1.5 * 1 / 5
    assert torch.allclose(got, torch.log_softmax(expected, -1), atol=1e-5)


def test_presence_penalty_subtracts_once_per_seen_id() -> None:
    logits = random_logits(1, seed=4)[0]
    ids = [1, 1, 1, 2, 150]
    got = processed_logprobs(SamplingParams(presence_penalty=-0.8), logits, ids)
    expected = logits.clone()
    expected[[1, 2, 150]] += 0.8  # a negative penalty encourages repeats
    assert torch.allclose(got, torch.log_softmax(expected, -1), atol=1e-5)


def test_penalties_compose_in_order_and_only_on_rows_that_ask() -> None:
    logits = random_logits(2, seed=6)
    ids = [10, 10, 20, 7, 7]
    both = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5, top_n_tokens=V)
    rows = [make_row(both, ids), make_row(SamplingParams(top_n_tokens=V), ids)]
    out = Sampler()(logits.clone(), rows)

    expected = logits[0].clone()
    for i in (7, 10, 20):
        expected[i] = expected[i] * 2.0 if expected[i] < 0 else expected[i] / 2.0
    expected[[7, 10]] -= 1.0 * 2 / 5 + 0.5
    expected[20] -= 1.0 * 1 / 5 + 0.5
    dense = [torch.full((V,), float("-inf")) for _ in range(2)]
    for r in range(2):
        for token_id, logprob in out.top_tokens[r]:
            dense[r][token_id] = logprob
    assert torch.allclose(dense[0], torch.log_softmax(expected, -1), atol=1e-5)
    assert torch.allclose(dense[1], torch.log_softmax(logits[1], -1), atol=1e-6)


def test_out_of_vocabulary_ids_do_not_leak_into_neighbouring_rows() -> None:
    # Penalties index the flattened batch, where id -1 of row 1 or id V + 4 of row 0 would be the neighbour's ids.
    logits = random_logits(2, seed=8)
    params = SamplingParams(presence_penalty=1.0, top_n_tokens=V)
    out = Sampler()(logits.clone(), [make_row(params, [1, V + 4]), make_row(params, [-1, 2])])
    for r, seen in ((0, 1), (1, 2)):
        expected = logits[r].clone()
        expected[seen] -= 1.0
        got = dict(out.top_tokens[r])
        assert torch.allclose(torch.tensor([got[i] for i in range(V)]), torch.log_softmax(expected, -1), atol=1e-5)


# --- top-n tokens ----------------------------------------------------------------------------------------------


def test_top_n_tokens_are_best_first_and_include_ties() -> None:
    logits = torch.tensor([[0.0, 5.0, 3.0, 3.0, 3.0, 1.0], [0.0, 5.0, 3.0, 3.0, 3.0, 1.0], [1.0, 2.0, 0.0, 0.0, 0, 0]])
    rows = [
        make_row(SamplingParams(top_n_tokens=2)),
        make_row(SamplingParams(top_n_tokens=1)),
        make_row(SamplingParams(top_n_tokens=0)),
    ]
    out = Sampler()(logits.clone(), rows)
    logprobs = torch.log_softmax(logits[0], -1)

    assert out.top_tokens[0][0] == (1, pytest.approx(logprobs[1].item(), abs=1e-6))
    assert {t for t, _ in out.top_tokens[0][1:]} == {2, 3, 4}  # three ids tied with the 2nd value
    assert [lp for _, lp in out.top_tokens[0][1:]] == pytest.approx([logprobs[2].item()] * 3, abs=1e-6)
    assert [t for t, _ in out.top_tokens[1]] == [1]
    assert out.top_tokens[2] == []
    assert out.top_tokens[0][0][1] == pytest.approx(out.logprobs[0], abs=1e-7)  # same number as the chosen logprob


def test_top_n_tokens_never_lists_removed_tokens() -> None:
    logits = random_logits(1)[0]
    out = Sampler()(logits.clone().unsqueeze(0), [make_row(SamplingParams(top_k=2, top_n_tokens=5))])
    assert len(out.top_tokens[0]) == 2
    assert {t for t, _ in out.top_tokens[0]} == set(logits.topk(2).indices.tolist())
