"""Medusa and MLP-speculator heads in TGI's checkpoint layouts, built by the test around the tiny Llama: found from
the speculator directory, their drafts equal a plain re-implementation of TGI's head math on transformers'
hidden states, and generation through them is exactly the base model's."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from loom import LLM, SamplingParams
from loom.testing.parity import hf_model, random_prompts

VOCAB = 50257


def _dims(llama_dir) -> tuple[int, int]:
    cfg = json.loads((llama_dir / "config.json").read_text())
    return int(cfg["hidden_size"]), int(cfg["vocab_size"])


def make_medusa(out, llama_dir, heads: int = 3, own_output: bool = True):
    hidden, vocab = _dims(llama_dir)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(heads):
        tensors[f"{i}.0.linear.weight"] = torch.randn(hidden, hidden, generator=g) * 0.05
        tensors[f"{i}.0.linear.bias"] = torch.randn(hidden, generator=g) * 0.05
        if own_output:
            tensors[f"{i}.1.weight"] = torch.randn(vocab, hidden, generator=g) * 0.05
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "medusa_lm_head.safetensors"))
    (out / "config.json").write_text(json.dumps({"medusa_num_heads": heads, "medusa_num_layers": 1,
                                                 "base_model_name_or_path": str(llama_dir)}))
    return out, tensors


def make_mlp_speculator(out, llama_dir, n_predict: int = 3, inner_dim: int = 48, tied: bool = False):
    hidden, vocab = _dims(llama_dir)
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for i in range(1 if tied else n_predict):
        tensors[f"speculator.emb.{i}.weight"] = torch.randn(vocab, inner_dim, generator=g) * 0.1
        tensors[f"speculator.head.{i}.weight"] = torch.randn(vocab, inner_dim, generator=g) * 0.1
        tensors[f"speculator.ln.{i}.weight"] = 1 + torch.randn(inner_dim, generator=g) * 0.1
        tensors[f"speculator.ln.{i}.bias"] = torch.randn(inner_dim, generator=g) * 0.1
    for i in range(2 if tied else n_predict):
        tensors[f"speculator.proj.{i}.weight"] = torch.randn(inner_dim, hidden if i == 0 else inner_dim,
                                                             generator=g) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["MLPSpeculatorPreTrainedModel"], "model_type": "mlp_speculator", "n_predict": n_predict,
        "inner_dim": inner_dim, "emb_dim": inner_dim, "vocab_size": vocab, "tie_weights": tied,
        "base_model_name_or_path": str(llama_dir)}))
    return out, {k.removeprefix("speculator."): v for k, v in tensors.items()}


def reference_medusa(tensors, heads, hidden, lm_head, own_output):
    out = []
    for i in range(heads):
        x = hidden + F.silu(hidden @ tensors[f"{i}.0.linear.weight"].T + tensors[f"{i}.0.linear.bias"])
        logits = x @ tensors[f"{i}.1.weight"].T if own_output else lm_head(x)
        out.append(int(logits.argmax()))
    return out


def reference_mlp(tensors, n, inner_dim, hidden, token, tied):
    state_weight = 0.5 ** (0.5 / n)
    emb_weight = math.sqrt(1 - state_weight**2)
    state, ind, out = hidden, token, []
    for i in range(n):
        e, p, h, ln = (0 if tied else i), (min(i, 1) if tied else i), (0 if tied else i), (0 if tied else i)
        z = tensors[f"emb.{e}.weight"][ind] * (emb_weight * math.sqrt(inner_dim / 2))
        state = state @ tensors[f"proj.{p}.weight"].T * state_weight + z
        state = state * torch.rsqrt(state.pow(2).mean(-1, keepdim=True) + 1e-6)
        state = F.gelu(state * tensors[f"ln.{ln}.weight"] + tensors[f"ln.{ln}.bias"])
        ind = int((state @ tensors[f"head.{h}.weight"].T).argmax())
        out.append(ind)
    return out


@pytest.mark.parametrize("kind", ["medusa", "medusa-shared-head", "mlp", "mlp-tied"])
def test_head_drafts_match_tgi_math_and_generation_is_unchanged(kind, llama_dir, tmp_path):
    if kind.startswith("medusa"):
        own = kind == "medusa"
        path, tensors = make_medusa(tmp_path / kind, llama_dir, heads=3, own_output=own)
    else:
        tied = kind == "mlp-tied"
        path, tensors = make_mlp_speculator(tmp_path / kind, llama_dir, n_predict=3, tied=tied)
    llm = LLM(path, dtype="float32", max_batch_total_tokens=2048)
    assert llm.engine.config.speculate == 3  # the head count, as TGI defaults it
    speculator = llm.engine.speculator
    prompt = random_prompts([12], VOCAB, seed=40)[0]

    # the drafts after the prompt's step: TGI's head math on transformers' final hidden state
    engine = llm.engine
    engine.add_request("p", prompt, SamplingParams(max_new_tokens=2))
    first = engine.step()[0].new_token_ids[0]
    drafts = speculator.proposer._drafts["p"]
    hf = hf_model(llama_dir)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), output_hidden_states=True)
        hidden = out.hidden_states[-1][0, -1]  # after the final norm: the LM head's input
        assert int(out.logits[0, -1].argmax()) == first
        if kind.startswith("medusa"):
            expected = reference_medusa(tensors, 3, hidden, hf.lm_head, kind == "medusa")
        else:
            expected = reference_mlp(tensors, 3, 48, hidden, first, kind == "mlp-tied")
    assert drafts == expected
    while engine.has_unfinished():
        engine.step()

    # generation through the heads: exactly the base model's tokens
    prompts = random_prompts([5, 30], VOCAB, seed=41)
    with_heads = llm.generate(prompts, SamplingParams(max_new_tokens=20))
    base = LLM(llama_dir, dtype="float32", max_batch_total_tokens=2048)
    assert [r.token_ids for r in with_heads] == [r.token_ids for r in base.generate(prompts, SamplingParams(
        max_new_tokens=20))]
    assert speculator.stats.num_proposed_tokens > 0
    llm.engine.check_integrity()


def test_more_speculation_than_heads_is_refused(llama_dir, tmp_path):
    path, _ = make_medusa(tmp_path / "m", llama_dir, heads=2)
    with pytest.raises(ValueError, match="only has `2` heads"):
        LLM(path, dtype="float32", max_batch_total_tokens=1024, speculate=3)
    llm = LLM(path, dtype="float32", max_batch_total_tokens=1024, speculate=1)  # fewer is fine
    assert llm.engine.config.speculate == 1


def test_missing_base_model_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1,
                                                      "base_model_name_or_path": "nobody/no-such-model"}))
    with pytest.raises(ValueError, match="neither a local directory nor in the Hugging Face cache"):
        LLM(tmp_path, max_batch_total_tokens=1024)


def test_launcher_reads_the_base_model_of_a_speculator(llama_dir, tmp_path):
    """`loom launch --model-id <medusa dir>`: the checks and the router's tokenizer use the base model, the engine
    gets the speculator directory."""
    from loom.launcher import base_of_speculator, build_run_config
    from loom.launcher_args import resolve

    path, _ = make_medusa(tmp_path / "m", llama_dir, heads=2)
    assert base_of_speculator(path) == llama_dir.resolve()
    assert base_of_speculator(llama_dir) == llama_dir
    config = build_run_config(resolve(["--speculate", "2"], environ={}), "org/medusa", path, tmp_path / "run",
                              base_of_speculator(path))
    assert config.model_dir == str(path) and config.router.model_dir == str(llama_dir.resolve())
    assert config.engine.speculate == 2
