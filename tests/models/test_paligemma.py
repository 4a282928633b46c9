"""PaliGemma 1 (Gemma) and PaliGemma 2 (Gemma 2) against transformers on tiny random checkpoints, and Gemma (v1)
text, float32.

PaliGemma's prompt attends to itself both ways (transformers: token types 0, the prefix block ORed into the causal
and sliding-window masks; Gemma 2's window here is 8 tokens, shorter than every prompt). Checked: logits at every
prompt position with the prompt in one step, then decodes and a recompute of prompt + generated tokens; the tail of
a prompt after prefix-cache hits (one token of it alone too); greedy tokens in a batch under a small prefill
budget; preemption; two tensor-parallel ranks; prefix-cache keys that depend on the whole prompt; the scheduler's
chunks. And what the Hub's configs and tokenizers leave to defaults: positions from 1, the text model's length,
SigLIP's activation and norm eps, "\n" as an added token (prompt ids still the processor's).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import EngineConfig, ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.engine.request import Request
from loom.engine.scheduler import Scheduler
from loom.multimodal import ImagePromptBuilder
from loom.protocol.multimodal import ImageInput, whole_prompt_extras
from loom.protocol.plan import NewSeq, RunningSeq, StepPlan
from loom.testing.paligemma_checkpoint import (
    TOKENS_PER_IMAGE, WINDOW, build_tiny_gemma, build_tiny_paligemma, load_hf, paligemma_inputs, paligemma_reference,
)
from loom.testing.parity import assert_greedy_parity, assert_logits_parity
from loom.testing.vlm_checkpoints import test_image as make_image
from loom.worker.runner import ModelRunner

BLOCK = 16


@pytest.fixture(scope="module", params=[1, 2], ids=["paligemma1", "paligemma2"])
def paligemma(request, tmp_path_factory):
    path = build_tiny_paligemma(tmp_path_factory.mktemp(f"paligemma{request.param}"), version=request.param)
    model, processor = load_hf(path)
    return request.param, path, model, processor


def _prompts():
    a, b = make_image(40, 30, seed=1), make_image(64, 48, seed=2)
    return {
        "image first": [a, "What is in this picture?"],  # PaliGemma's own layout
        "two images after text": ["Compare ", a, " with ", b, " please"],  # BOS after the last image
        "text only": "Just text and no picture at all, in a prompt longer than the window.",
    }


def _text(pieces, placeholder: str = "<image>") -> str:
    return pieces if isinstance(pieces, str) else "".join(p if isinstance(p, str) else placeholder for p in pieces)


def _images(pieces) -> list:
    return [] if isinstance(pieces, str) else [p for p in pieces if not isinstance(p, str)]


def _loom_prompt(builder: ImagePromptBuilder, processor, pieces):
    """Loom's ids and images for a prompt: `loom.LLM`'s way (the processor with images, the tokenizer without)."""
    if isinstance(pieces, str):
        return processor.tokenizer(pieces)["input_ids"], []
    built = builder.build(pieces)
    return built.token_ids, built.images


def _hf_logits(model, inputs: dict, continuation: list[int] = ()) -> torch.Tensor:
    """transformers' logits over the prompt (token type 0) and then `continuation` (type 1, as `generate` makes)."""
    inputs = dict(inputs)
    if continuation:
        extra = torch.tensor([list(continuation)])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.ones_like(extra)], 1)
    with torch.no_grad():
        return model(**inputs).logits[0].float()


def _forward(runner: ModelRunner, plan: StepPlan) -> torch.Tensor:
    return runner.forward_logits(plan)


def _drop(runner: ModelRunner, kv: KVCacheManager, rid: str) -> None:
    kv.free(rid)
    runner.forward_logits(StepPlan([], [], [rid], BLOCK))


def test_logits_match_transformers(paligemma):
    """The prompt in one step, then decodes of transformers' greedy tokens; then prompt + those tokens recomputed in
    one step (a preempted request): every position's logits."""
    version, path, model, processor = paligemma
    config = ModelConfig.from_dir(path, "float32")
    builder = ImagePromptBuilder(path, config.hf_config)
    runner = ModelRunner(config, num_blocks=16, block_size=BLOCK)
    kv = KVCacheManager(16, BLOCK, enable_prefix_caching=False)
    for label, pieces in _prompts().items():
        ids, images = _loom_prompt(builder, processor, pieces)
        inputs = paligemma_inputs(processor, _text(pieces), _images(pieces))
        assert ids == inputs["input_ids"][0].tolist(), f"{label}: prompt ids"
        n = len(ids)
        assert n > WINDOW
        ref = paligemma_reference(model, processor, "", [], max_new_tokens=6, inputs=inputs)
        expected = _hf_logits(model, inputs, ref.greedy)
        where = f"PaliGemma {version}, {label}"

        # the prompt in one step, then one decode per generated token
        assert kv.allocate("p", n + len(ref.greedy))
        got = [_forward(runner, StepPlan([NewSeq("p", list(ids), n, 0, n, kv.block_ids("p"), SamplingParams(), True,
                                                 images)], [], [], BLOCK))]
        for i, token in enumerate(ref.greedy[:-1]):
            got.append(_forward(runner, StepPlan([], [RunningSeq("p", n + i, [token])], [], BLOCK)))
        got = torch.cat(got)
        assert got.shape[0] == n + len(ref.greedy) - 1
        diff = (got - expected[: got.shape[0]]).abs().max().item()
        assert diff < 1e-4, f"{where}: prompt + decodes, max abs diff {diff}"
        assert got[n - 1 :].argmax(-1).tolist() == ref.greedy
        _drop(runner, kv, "p")

        # recomputed: prompt and generated tokens in one step (the prompt both ways, the rest causal)
        full = list(ids) + ref.greedy[:-1]
        assert kv.allocate("r", len(full))
        got = _forward(runner, StepPlan([NewSeq("r", full, n, 0, len(full), kv.block_ids("r"), SamplingParams(),
                                                True, images)], [], [], BLOCK))
        diff = (got - expected[: len(full)]).abs().max().item()
        assert diff < 1e-4, f"{where}: recompute, max abs diff {diff}"
        _drop(runner, kv, "r")
    kv.check_integrity()


def test_positions_count_from_one(paligemma):
    """transformers' PaliGemma adds 1 to every position: the language model sees position + 1, and its rotary
    tables hold the last one."""
    _, path, _, _ = paligemma
    config = ModelConfig.from_dir(path, "float32")
    model = ModelRunner(config, num_blocks=4, block_size=BLOCK).model
    for rotary in model.language_model.model.rotary.values():
        assert rotary.cos.shape[0] == config.max_model_len + 1
    seen = []
    model.language_model.forward = lambda ids, positions, embeds=None: seen.append(positions)
    model(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    assert seen[0].tolist() == [1, 2, 3]


def test_length_defaults_to_transformers_when_the_text_config_leaves_it_out(paligemma, tmp_path):
    _, path, model, _ = paligemma
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["text_config"]["max_position_embeddings"]  # as in the PaliGemma checkpoints on the Hub
    (bare / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_dir(bare, "float32").max_model_len == 8192
    assert type(model.config.text_config)(**cfg["text_config"]).max_position_embeddings == 8192


def test_vision_config_without_activation_and_eps_reads_siglip_defaults(paligemma, tmp_path):
    """The Hub's PaliGemma (and Gemma 3) vision configs leave out `hidden_act` and `layer_norm_eps`: SigLIP's
    defaults (gelu-tanh, 1e-6) apply, as in transformers, not CLIP's."""
    version, path, model, processor = paligemma
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    cfg = json.loads((bare / "config.json").read_text())
    for key in ("hidden_act", "layer_norm_eps"):
        assert cfg["vision_config"].pop(key) == getattr(type(model.config.vision_config)(), key)
    (bare / "config.json").write_text(json.dumps(cfg))
    config = ModelConfig.from_dir(bare, "float32")
    pieces = [make_image(40, 30, seed=1), "What is in this picture?"]
    ids, images = _loom_prompt(ImagePromptBuilder(bare, config.hf_config), processor, pieces)
    kv = KVCacheManager(4, BLOCK, enable_prefix_caching=False)
    runner = ModelRunner(config, num_blocks=4, block_size=BLOCK)
    assert kv.allocate("p", len(ids))
    got = _forward(runner, StepPlan([NewSeq("p", list(ids), len(ids), 0, len(ids), kv.block_ids("p"),
                                            SamplingParams(), True, images)], [], [], BLOCK))
    expected = _hf_logits(model, paligemma_inputs(processor, _text(pieces), _images(pieces)))
    assert (got - expected).abs().max().item() < 1e-4


def test_prompt_ids_are_the_processors_when_newline_is_an_added_token(paligemma, tmp_path):
    """With "\n" an added token (transformers turns SentencePiece's user-defined symbols into added tokens), one
    image's expansion by the processor (`<image>`s, BOS, "\n") is bounded by added tokens; spliced into the text it
    would put "\n" after BOS instead of at the prompt's end."""
    import transformers

    _, path, _, _ = paligemma
    copy = tmp_path / "newline"
    shutil.copytree(path, copy)
    tokenizer = transformers.AutoTokenizer.from_pretrained(copy)
    tokenizer.add_tokens([transformers.AddedToken("\n", normalized=False, special=False)])
    tokenizer.save_pretrained(copy)
    builder = ImagePromptBuilder(copy, ModelConfig.from_dir(copy, "float32").hf_config)
    image = make_image(40, 30, seed=1)
    for pieces in ([image, "caption en"], ["Compare ", image, " with ", image, " please"]):
        expected = paligemma_inputs(builder.processor, _text(pieces), _images(pieces))["input_ids"][0].tolist()
        assert expected[-1] == tokenizer.convert_tokens_to_ids("\n")
        assert builder.build(pieces).token_ids == expected


def test_reference_prompt_attends_both_ways(paligemma):
    """The oracle's prefix is bidirectional: the first position's logits change with the prompt's last token."""
    _, _, model, processor = paligemma
    image = make_image(40, 30, seed=1)
    one = paligemma_inputs(processor, "<image>What is this?", [image])
    other = paligemma_inputs(processor, "<image>What is that?", [image])
    assert one["input_ids"].shape == other["input_ids"].shape
    assert (_hf_logits(model, one)[0] - _hf_logits(model, other)[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("words", [15, 20])
def test_prompt_tail_after_prefix_cache_hits(paligemma, words):
    """A second request with the same prompt reuses its full blocks and computes the rest: the tail attends to
    the whole prompt (15 words: a 33-token prompt, the last token alone, which must not take the decode path's
    sliding window)."""
    version, path, model, processor = paligemma
    config = ModelConfig.from_dir(path, "float32")
    builder = ImagePromptBuilder(path, config.hf_config)
    runner = ModelRunner(config, num_blocks=16, block_size=BLOCK)
    kv = KVCacheManager(16, BLOCK, enable_prefix_caching=True)
    pieces = [make_image(40, 30, seed=3), " a" * words]
    ids, images = _loom_prompt(builder, processor, pieces)
    n = len(ids)
    assert n == TOKENS_PER_IMAGE + 1 + words + 1  # images, BOS, words, "\n"
    expected = _hf_logits(model, paligemma_inputs(processor, _text(pieces), _images(pieces)))
    extras = whole_prompt_extras(ids, images, kv.blocks_needed(n))

    assert kv.allocate("a", n)
    first = _forward(runner, StepPlan([NewSeq("a", list(ids), n, 0, n, kv.block_ids("a"), SamplingParams(), True,
                                              images)], [], [], BLOCK))
    assert (first - expected).abs().max().item() < 1e-4
    kv.index_full_blocks("a", ids, n, None, extras)
    hits = kv.find_cached_prefix(ids, None, extras)
    start = len(hits) * BLOCK
    assert start == (n - 1) // BLOCK * BLOCK and start > 0
    assert kv.allocate("b", n, hits)
    tail = _forward(runner, StepPlan([NewSeq("b", list(ids), n, start, n - start, kv.block_ids("b"),
                                             SamplingParams(), True, images)], [], [], BLOCK))
    if n - start == 1:  # the last position alone: its logits only (it samples)
        expected_tail = expected[-1:]
    else:
        expected_tail = expected[start:]
    diff = (tail - expected_tail).abs().max().item()
    assert diff < 1e-4, f"PaliGemma {version}, tail of {n - start} after {start} cached: max abs diff {diff}"
    _drop(runner, kv, "b")
    _drop(runner, kv, "a")
    kv.check_integrity()


def test_greedy_batch_matches_transformers(paligemma):
    """Under a prefill budget smaller than any prompt: each prompt is computed whole in one step."""
    version, path, model, processor = paligemma
    prompts = list(_prompts().values())
    llm = LLM(path, dtype="float32", max_batch_total_tokens=4096, max_batch_prefill_tokens=12)
    results = llm.generate(prompts, SamplingParams(max_new_tokens=8))
    for pieces, result in zip(prompts, results):
        ref = paligemma_reference(model, processor, _text(pieces), _images(pieces), max_new_tokens=8)
        assert result.prompt_token_ids == ref.input_ids
        assert result.error is None
        assert result.token_ids == ref.greedy, f"PaliGemma {version}: {_text(pieces)!r}"
    assert llm.engine.scheduler.stats.num_computed_prompt_tokens == sum(len(r.prompt_token_ids) for r in results)
    llm.engine.check_integrity()


def test_preempted_requests_come_back_with_the_same_tokens(paligemma):
    _, path, _, _ = paligemma
    prompts = [[make_image(40 + 8 * i, 30, seed=i), f"Picture {i} says what?"] for i in range(6)]
    params = SamplingParams(max_new_tokens=30)
    roomy = LLM(path, dtype="float32", max_batch_total_tokens=4096)
    expected = [r.token_ids for r in roomy.generate(prompts, params)]
    tight = LLM(path, dtype="float32", max_batch_total_tokens=192, max_batch_prefill_tokens=32)
    results = tight.generate(prompts, params)
    assert tight.engine.scheduler.stats.num_preemptions > 0
    assert [r.token_ids for r in results] == expected
    tight.engine.check_integrity()


def test_two_ranks_match_one_rank(paligemma):
    """Tensor parallelism: the language model sharded, the vision tower on each rank, the same tokens."""
    _, path, _, _ = paligemma
    prompts = list(_prompts().values())
    params = SamplingParams(max_new_tokens=8)
    args = {"max_batch_total_tokens": 4096, "max_batch_prefill_tokens": 12}
    expected = [r.token_ids for r in LLM(path, dtype="float32", **args).generate(prompts, params)]
    with LLM(path, dtype="float32", tensor_parallel_size=2, **args) as llm:
        results = llm.generate(prompts, params)
        llm.engine.check_integrity()
        [worker] = multiprocessing.active_children()
    assert [r.token_ids for r in results] == expected
    worker.join(5)
    assert worker.exitcode == 0


def test_prefix_cache_shares_blocks_only_between_equal_prompts(paligemma):
    """Two prompts equal for more than two blocks share none (each block's K/V depend on the tokens after it); the
    same prompt again shares all its full blocks."""
    version, path, model, processor = paligemma
    llm = LLM(path, dtype="float32", max_batch_total_tokens=4096)
    image = make_image(40, 30, seed=1)
    shared = (" A question long enough to fill more than two blocks of the cache, with or without the image before"
              " it: what does the picture show, where was it taken, and what happened just")
    params = SamplingParams(max_new_tokens=6)
    for first_pieces, other_pieces in (([image, shared + " more?"], [image, shared + " less?"]),
                                       (shared + " more?", shared + " less?")):
        first = llm.generate([first_pieces], params)[0]
        other = llm.generate([other_pieces], params)[0]
        again = llm.generate([first_pieces], params)[0]
        common = next(i for i, (x, y) in enumerate(zip(first.prompt_token_ids, other.prompt_token_ids)) if x != y)
        assert common >= 2 * BLOCK  # token-wise, two blocks would match
        assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0
        assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // BLOCK * BLOCK
        assert again.token_ids == first.token_ids
        for pieces, result in ((first_pieces, first), (other_pieces, other)):
            ref = paligemma_reference(model, processor, _text(pieces), _images(pieces), max_new_tokens=6)
            assert result.token_ids == ref.greedy, f"PaliGemma {version}: {_text(pieces)!r}"
    llm.engine.check_integrity()


def test_whole_prompt_extras_depend_on_every_token_and_image():
    image = ImageInput(offset=0, length=4, num_embeds=4, content_hash=b"a" * 16, tensors={})
    other_image = ImageInput(offset=0, length=4, num_embeds=4, content_hash=b"b" * 16, tensors={})
    ids = list(range(40))
    keys = whole_prompt_extras(ids, [image], 3)
    assert len(keys) == 3 and len(set(keys)) == 1
    assert keys == whole_prompt_extras(list(ids), [image], 3)
    assert keys[0] != whole_prompt_extras(ids[:-1] + [99], [image], 3)[0]  # the last token changes the first block
    assert keys[0] != whole_prompt_extras(ids + [40], [image], 3)[0]
    assert keys[0] != whole_prompt_extras(ids, [other_image], 3)[0]
    assert keys[0] != whole_prompt_extras(ids, [], 3)[0]


def test_scheduler_computes_a_prompt_that_attends_both_ways_in_one_step():
    def chunks(budget: int, whole: bool, cached: int = 0, generated: int = 0) -> list[int]:
        scheduler = Scheduler(EngineConfig(max_batch_prefill_tokens=budget), KVCacheManager(64, BLOCK))
        scheduler.whole_prompts = whole
        request = Request("r", list(range(40)), SamplingParams(), 4, frozenset())
        request.token_ids += list(range(generated))  # a preempted request's recompute: prompt + generated
        scheduler.add(request)
        assert len(request.block_extras) == (3 if whole else 0)
        request.num_computed_tokens = cached
        sizes = []
        while request.num_computed_tokens < request.num_tokens:
            start = request.num_computed_tokens
            sizes.append(scheduler._chunk(request, start, budget))
            request.num_computed_tokens += sizes[-1]
        return sizes

    assert chunks(12, whole=False) == [12, 12, 12, 4]
    assert chunks(12, whole=True) == [40]  # past the budget
    assert chunks(12, whole=True, cached=32) == [8]  # the tail after cached blocks
    assert chunks(12, whole=True, generated=15) == [40, 12, 3]  # generated tokens: chunked as usual
    assert chunks(64, whole=True, generated=15) == [55]


# ---------------------------------------------------------------------------------------------- Gemma (v1)
@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tokenizer_dir):
    return build_tiny_gemma(tmp_path_factory.mktemp("gemma"), tokenizer_dir)


def test_gemma_logits_match_transformers(gemma_dir):
    assert_logits_parity(gemma_dir, lengths=(1, 7, 40), chunks=(None, 5, 1))


def test_gemma_greedy_generation_matches_transformers(gemma_dir):
    assert_greedy_parity(gemma_dir)


@pytest.mark.parametrize(("change", "message"), [
    ({"final_logit_softcapping": 30.0}, "Gemma does not soft-cap"),
    ({"attn_logit_softcapping": 50.0}, "Gemma does not soft-cap"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
])
def test_gemma_refuses_options_it_does_not_have(gemma_dir, tmp_path, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(gemma_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        LLM(bad, max_batch_total_tokens=256)
