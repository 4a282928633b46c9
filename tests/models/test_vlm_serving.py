"""Vision-language models under the engine's harder paths: preemption (the request and its images come back in
full and are encoded again), tensor parallelism (the vision tower replicated on each rank, the plan carrying the
images), image paths in `loom.LLM`, and prompts the engine refuses."""

from __future__ import annotations

import multiprocessing

import pytest

from loom import LLM, SamplingParams
from loom.testing.vlm_checkpoints import build_tiny_vlm, test_image as make_image

PROMPTS_OF = {
    "many": lambda: [[f"Picture {i}: ", make_image(40 + 8 * i, 30, seed=i), " says what?"] for i in range(6)],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: build_tiny_vlm(name, tmp_path_factory.mktemp(name)) for name in ("qwen2_vl", "gemma3", "llava")}


def test_preempted_image_requests_come_back_with_the_same_tokens(checkpoints):
    prompts = PROMPTS_OF["many"]()
    params = SamplingParams(max_new_tokens=40)
    roomy = LLM(checkpoints["qwen2_vl"], dtype="float32", max_batch_total_tokens=4096)
    expected = [r.token_ids for r in roomy.generate(prompts, params)]
    # 12 blocks of 16 for six requests that grow to ~60 tokens each: the newest are preempted and recomputed
    tight = LLM(checkpoints["qwen2_vl"], dtype="float32", max_batch_total_tokens=192, max_batch_prefill_tokens=32)
    results = tight.generate(prompts, params)
    assert tight.engine.scheduler.stats.num_preemptions > 0
    assert [r.token_ids for r in results] == expected
    tight.engine.check_integrity()


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_two_ranks_match_one_rank_with_images(checkpoints, family):
    prompts = PROMPTS_OF["many"]()[:3] + ["A text-only prompt in the same batch"]
    params = SamplingParams(max_new_tokens=12)
    args = {"max_batch_total_tokens": 4096, "max_batch_prefill_tokens": 24}
    expected = [r.token_ids for r in LLM(checkpoints[family], dtype="float32", **args).generate(prompts, params)]
    with LLM(checkpoints[family], dtype="float32", tensor_parallel_size=2, **args) as llm:
        results = llm.generate(prompts, params)
        llm.engine.check_integrity()
        [worker] = multiprocessing.active_children()
    assert [r.token_ids for r in results] == expected
    worker.join(5)
    assert worker.exitcode == 0


def test_llm_takes_image_paths_and_refuses_what_it_cannot_show(checkpoints, tmp_path, llama_dir):
    image = make_image(40, 30, seed=7)
    path = tmp_path / "picture.png"
    image.save(path)
    llm = LLM(checkpoints["llava"], dtype="float32", max_batch_total_tokens=2048)
    params = SamplingParams(max_new_tokens=6)
    from_path, from_pil = llm.generate([["Look: ", path, " ok?"], ["Look: ", image, " ok?"]], params)
    assert from_path.token_ids == from_pil.token_ids
    with pytest.raises(ValueError, match="image tokens that belong to no image"):
        llm.generate(["a literal <image> with no picture"], params)
    with pytest.raises(TypeError, match="a PIL image or an image path"):
        llm.generate([["text", 3.5]], params)
    text_only = LLM(llama_dir, dtype="float32", max_batch_total_tokens=512)
    with pytest.raises(ValueError, match="not a vision-language model"):
        text_only.generate([["Look: ", image]], params)
    llm.engine.check_integrity()


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_speculative_decoding_with_images_keeps_the_tokens(checkpoints, family):
    """Drafts verified after an image prompt (M-RoPE positions past the prompt, Gemma 3's whole images) accept and
    reject as without images: the tokens equal plain decoding's."""
    from loom.testing.speculation import OracleProposer

    prompts = PROMPTS_OF["many"]()[:3]
    params = SamplingParams(max_new_tokens=16)
    plain = LLM(checkpoints[family], dtype="float32", max_batch_total_tokens=4096)
    results = plain.generate(prompts, params)
    expected = [r.token_ids for r in results]
    llm = LLM(checkpoints[family], dtype="float32", max_batch_total_tokens=4096, speculate=3)
    speculator = llm.engine.scheduler.speculator
    speculator.cost = None  # verify every draft
    speculator.proposer = OracleProposer([r.prompt_token_ids + r.token_ids for r in results],
                                         llm.engine.model_config.vocab_size, wrong_rate=0.3)
    assert [r.token_ids for r in llm.generate(prompts, params)] == expected
    assert 0 < speculator.stats.num_accepted_tokens < speculator.stats.num_draft_tokens
    llm.engine.check_integrity()
