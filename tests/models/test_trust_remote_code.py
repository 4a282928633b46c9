"""`--trust-remote-code`: a checkpoint whose config.json maps to its own modeling code (`auto_map`) is refused with
TGI's message without the flag, and runs through the transformers path with it (here: custom code that is the
Llama code under another name, so its output must be the plain Llama's)."""

from __future__ import annotations

import json
import shutil

import pytest

from loom import LLM, SamplingParams
from loom.testing.parity import random_prompts

MODELING = '''
from transformers import LlamaConfig, LlamaForCausalLM


class LoomTestLlamaConfig(LlamaConfig):
    model_type = "loom_test_llama"


class LoomTestLlamaForCausalLM(LlamaForCausalLM):
    config_class = LoomTestLlamaConfig
'''


@pytest.fixture(scope="module")
def custom_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote-code") / "model"
    shutil.copytree(llama_dir, out)
    (out / "modeling_loom_test.py").write_text(MODELING)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="loom_test_llama", architectures=["LoomTestLlamaForCausalLM"], auto_map={
        "AutoConfig": "modeling_loom_test.LoomTestLlamaConfig",
        "AutoModelForCausalLM": "modeling_loom_test.LoomTestLlamaForCausalLM"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_refused_without_the_flag(custom_dir):
    with pytest.raises(ValueError, match="Unsupported model type loom_test_llama.*--trust-remote-code"):
        LLM(custom_dir, dtype="float32", max_batch_total_tokens=512)


def test_runs_the_checkpoints_code_with_the_flag(custom_dir, llama_dir):
    prompts = random_prompts([5, 19], 50257, seed=70)
    params = SamplingParams(max_new_tokens=16)
    custom = LLM(custom_dir, dtype="float32", max_batch_total_tokens=1024, trust_remote_code=True)
    assert type(custom.engine.runner.model).__name__ == "TransformersForCausalLM"
    plain = LLM(llama_dir, dtype="float32", max_batch_total_tokens=1024)
    assert [r.token_ids for r in custom.generate(prompts, params)] == \
        [r.token_ids for r in plain.generate(prompts, params)]


def test_launcher_flag_and_env(custom_dir):
    from loom.launcher_args import resolve

    assert resolve(["--trust-remote-code"], environ={})["trust_remote_code"]
    assert resolve([], environ={"TRUST_REMOTE_CODE": "true"})["trust_remote_code"]
