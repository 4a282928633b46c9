"""Vision-language families against transformers on tiny random checkpoints: float32 logits at every prompt
position (one prefill, chunks that split an image, one token at a time) and greedy generation in a batch that
mixes image and text-only prompts under chunked prefill; the prefix cache tells images apart."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.multimodal import ImagePromptBuilder
from loom.protocol.plan import NewSeq, RunningSeq, StepPlan
from loom.testing.vlm_checkpoints import build_tiny_vlm, hf_reference, load_hf, test_image as make_image
from loom.worker.runner import ModelRunner

FAMILIES = ("llava", "llava_next", "idefics3", "smolvlm", "gemma3", "qwen2_vl", "qwen2_5_vl")
BLOCK = 16


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = build_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param))
    model, processor = load_hf(path)
    return request.param, path, model, processor


def _text(builder: ImagePromptBuilder, pieces: list) -> str:
    return "".join(p if isinstance(p, str) else builder.placeholder for p in pieces)


def _prompts():
    a, b = make_image(40, 30, seed=1), make_image(64, 48, seed=2)
    return {
        "one image": ["<|im_start|>user\nWhat is in ", a, " this picture?<|im_end|>\n<|im_start|>assistant\n"],
        "two images": ["Compare ", a, " with ", b, " please"],
        "image first": [b, "Describe it."],
    }


def _paged_logits(runner: ModelRunner, kv: KVCacheManager, ids: list[int], images, chunk: int) -> torch.Tensor:
    assert kv.allocate("p", len(ids))
    try:
        out = []
        whole = getattr(runner.model, "bidirectional_images", False)
        start = 0
        while start < len(ids):
            end = min(start + chunk, len(ids))
            for image in images if whole else ():  # the scheduler's rule: no chunk ends inside such an image
                if image.offset < end < image.end:
                    end = image.offset if image.offset > start else image.end
            piece = ids[start:end]
            if start == 0:
                plan = StepPlan([NewSeq("p", list(ids), len(ids), 0, len(piece), kv.block_ids("p"), SamplingParams(),
                                        True, images)], [], [], BLOCK)
            else:
                plan = StepPlan([], [RunningSeq("p", start, piece)], [], BLOCK)
            out.append(runner.forward_logits(plan))
            start = end
        return torch.cat(out)
    finally:
        kv.free("p")
        runner.forward_logits(StepPlan([], [], ["p"], BLOCK))


def test_logits_match_transformers(family):
    name, path, model, processor = family
    config = ModelConfig.from_dir(path, "float32")
    builder = ImagePromptBuilder(path, config.hf_config)
    runner = ModelRunner(config, num_blocks=64, block_size=BLOCK)
    kv = KVCacheManager(64, BLOCK, enable_prefix_caching=False)
    for label, pieces in _prompts().items():
        images = [p for p in pieces if not isinstance(p, str)]
        ref = hf_reference(path, _text(builder, pieces), images, max_new_tokens=1, model=model, processor=processor)
        prompt = builder.build(pieces)
        assert prompt.token_ids == ref.input_ids[0].tolist(), f"{name}, {label}: prompt ids"
        assert len(prompt.images) == len(images)
        # 7 and 1 split every image's tokens over steps (the encoder cache), except where the family's image tokens
        # attend both ways (Gemma 3), whose images the scheduler computes whole
        for chunk in (None, 7, 1):
            got = _paged_logits(runner, kv, prompt.token_ids, prompt.images, chunk or len(prompt.token_ids))
            diff = (got - ref.logits).abs().max().item()
            assert diff < 1e-4, f"{name}, {label}, chunk {chunk}: max abs diff {diff}"
    kv.check_integrity()


def test_greedy_batch_matches_transformers(family):
    name, path, model, processor = family
    prompts = list(_prompts().values()) + ["<|im_start|>user\nJust text.<|im_end|>\n"]
    llm = LLM(path, dtype="float32", max_batch_total_tokens=4096, max_batch_prefill_tokens=24)
    results = llm.generate(prompts, SamplingParams(max_new_tokens=8))
    placeholder = ImagePromptBuilder(path, llm.engine.model_config.hf_config).placeholder
    for pieces, result in zip(prompts, results):
        if isinstance(pieces, str):
            ref = hf_reference(path, pieces, [], max_new_tokens=8, model=model, processor=processor)
        else:
            text = "".join(p if isinstance(p, str) else placeholder for p in pieces)
            ref = hf_reference(path, text, [p for p in pieces if not isinstance(p, str)], max_new_tokens=8,
                               model=model, processor=processor)
        assert result.token_ids == ref.greedy, f"{name}: {pieces if isinstance(pieces, str) else 'image prompt'}"
    llm.engine.check_integrity()


def test_prefix_cache_tells_images_apart(family):
    name, path, _, _ = family
    llm = LLM(path, dtype="float32", max_batch_total_tokens=4096)
    a, b = make_image(40, 30, seed=1), make_image(40, 30, seed=5)
    text = "A long enough preamble that fills more than one block of the cache before the image: "
    after = " so what is shown here, in a few words? Please answer briefly, and in plain English."
    first = llm.generate([[text, a, after]], SamplingParams(max_new_tokens=4))[0]
    other = llm.generate([[text, b, after]], SamplingParams(max_new_tokens=4))[0]
    again = llm.generate([[text, a, after]], SamplingParams(max_new_tokens=4))[0]
    n_text = len(llm.tokenizer.encode(text))
    image_block = n_text // BLOCK  # the first block holding image tokens
    # the text blocks before the image are shared; from the image's first block on, another image is another block
    assert other.num_cached_tokens == image_block * BLOCK, name
    assert again.num_cached_tokens > other.num_cached_tokens, name
    assert again.token_ids == first.token_ids
    llm.engine.check_integrity()


def test_scheduler_never_ends_a_chunk_inside_an_image_that_attends_both_ways():
    from loom.config import EngineConfig
    from loom.engine.request import Request
    from loom.engine.scheduler import Scheduler
    from loom.protocol.multimodal import ImageInput

    def chunks(budget: int, whole: bool) -> list[int]:
        scheduler = Scheduler(EngineConfig(max_batch_prefill_tokens=budget), KVCacheManager(64, BLOCK))
        scheduler.whole_images = whole
        image = ImageInput(offset=10, length=6, num_embeds=6, content_hash=b"x", tensors={})
        request = Request("r", list(range(40)), SamplingParams(), 4, frozenset(), images=[image])
        scheduler.add(request)
        sizes = []
        while request.num_computed_tokens < request.num_prompt_tokens:
            out = scheduler.schedule()
            (seq,) = out.seqs
            sizes.append(seq.num_new_tokens)
            request.num_computed_tokens += seq.num_new_tokens
        return sizes

    assert chunks(12, whole=False) == [12, 12, 12, 4]
    assert chunks(12, whole=True) == [10, 12, 12, 6]  # ends before the image, then takes it whole
    assert chunks(4, whole=True) == [4, 4, 2, 6, 4, 4, 4, 4, 4, 4]  # the image past the budget of 4


def test_prompt_ids_equal_the_processor_on_the_whole_prompt(family):
    """The builder tokenizes the text once and splices each image's expansion in (for families whose expansion is
    bounded by special tokens), instead of processing every image twice: the ids must be the processor's own."""
    name, path, _, processor = family
    builder = ImagePromptBuilder(path, ModelConfig.from_dir(path, "float32").hf_config)
    a, b = make_image(40, 30, seed=1), make_image(64, 48, seed=2)
    cases = [[a], [a, b], [" lead", a, "  two  spaces ", b, "\n\nend\n"], [a, "\n", b],
             ["<|im_start|>user\n", a, "hi<|im_end|>\n"]]
    for pieces in cases:
        images = [p for p in pieces if not isinstance(p, str)]
        whole = processor(text=[_text(builder, pieces)], images=[images], return_tensors="pt")
        assert builder.build(pieces).token_ids == whole["input_ids"][0].tolist(), (name, pieces)


def test_the_images_a_step_starts_share_an_encoder_budget():
    """The vision tower of every image a step starts runs in that step: past max_batch_prefill_tokens embeddings,
    a chunk ends before its image (one image always goes), so decodes wait for one budget's worth of towers at most."""
    from loom.config import EngineConfig
    from loom.engine.request import Request
    from loom.engine.scheduler import Scheduler
    from loom.protocol.multimodal import ImageInput

    scheduler = Scheduler(EngineConfig(max_batch_prefill_tokens=512), KVCacheManager(256, BLOCK))
    requests = []
    for name, embeds in (("a", 300), ("b", 300), ("c", 700)):
        image = ImageInput(offset=10, length=embeds, num_embeds=embeds, content_hash=name.encode(), tensors={})
        requests.append(Request(name, list(range(embeds + 40)), SamplingParams(), 4, frozenset(), images=[image]))
        scheduler.add(requests[-1])

    def step() -> dict[str, tuple[int, int]]:
        out = scheduler.schedule()
        for seq in out.seqs:
            seq.request.num_computed_tokens += seq.num_new_tokens
        return {s.request.request_id: (s.start, s.num_new_tokens) for s in out.seqs}

    # a's prompt and image (300 embeddings); b's and c's images would pass 512: their chunks end before them
    assert step() == {"a": (0, 340), "b": (0, 10), "c": (0, 10)}
    # b's image now (a has no tokens left to compute here); c's would pass the budget: c waits a step
    assert step() == {"b": (10, 330)}
    # c's image alone is past the budget: it goes as the step's first image
    assert step() == {"c": (10, 512)}
    # a prompt computed whole (PaliGemma) whose images together pass the budget goes as the step's first
    whole = Scheduler(EngineConfig(max_batch_prefill_tokens=512), KVCacheManager(256, BLOCK))
    whole.whole_prompts = True
    images = [ImageInput(offset=o, length=300, num_embeds=300, content_hash=str(o).encode(), tensors={})
              for o in (0, 300)]
    for name in ("p", "q"):
        whole.add(Request(name, list(range(610)), SamplingParams(), 4, frozenset(), images=list(images)))
    assert {s.request.request_id: s.num_new_tokens for s in whole.schedule().seqs} == {"p": 610}  # q waits
