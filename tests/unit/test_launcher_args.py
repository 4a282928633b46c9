"""Launcher flags: TGI's names and defaults, environment variables, refusals."""

from __future__ import annotations

import pytest

from loom.launcher_args import build_parser, resolve


def test_tgi_defaults():
    args = resolve([], environ={})
    assert args["port"] == 3000 and args["hostname"] == "0.0.0.0"
    assert args["max_concurrent_requests"] == 128 and args["max_best_of"] == 2
    assert args["max_stop_sequences"] == 4 and args["max_top_n_tokens"] == 5
    assert args["max_client_batch_size"] == 4 and args["payload_limit"] == 2_000_000
    assert args["waiting_served_ratio"] == 0.3 and args["max_waiting_tokens"] == 20
    assert args["graceful_termination_timeout"] == 90 and args["prometheus_port"] == 9000
    assert args["model_id"] is None and args["json_output"] is False


def test_environment_variables_and_command_line_precedence():
    env = {"MAX_BATCH_SIZE": "7", "PORT": "8080", "JSON_OUTPUT": "true", "API_KEY": "k",
           "CORS_ALLOW_ORIGIN": "https://a.example", "MODEL_ID": "/models/x"}
    args = resolve([], environ=env)
    assert args["max_batch_size"] == 7 and args["port"] == 8080 and args["json_output"] is True
    assert args["api_key"] == "k" and args["cors_allow_origin"] == ["https://a.example"]
    assert args["model_id"] == "/models/x"
    assert resolve(["--port", "9999"], environ=env)["port"] == 9999


def test_legacy_max_input_length():
    assert resolve(["--max-input-length", "100"], environ={})["max_input_tokens"] == 100
    with pytest.raises(SystemExit, match="not both"):
        resolve(["--max-input-length", "100", "--max-input-tokens", "100"], environ={})
    with pytest.raises(SystemExit, match="`max_input_tokens` must be < `max_total_tokens`"):
        resolve(["--max-input-tokens", "100", "--max-total-tokens", "100"], environ={})


@pytest.mark.parametrize("argv, env, message", [
    (["--quantize", "int3"], {}, "'int3' is not a TGI quantization method; Loom takes eetq, bitsandbytes"),
    ([], {"QUANTIZE": "exl2"}, "--quantize exl2: ExLlamaV2 checkpoints are not supported"),
    (["--ngrok"], {}, "Loom opens no tunnels"),
])
def test_unsupported_flags_are_refused(argv, env, message):
    with pytest.raises(SystemExit, match=message):
        resolve(argv, environ=env)


def test_quantize_takes_tgi_method_names():
    assert resolve(["--quantize", "bitsandbytes-nf4"], environ={})["quantize"] == "bitsandbytes-nf4"
    assert resolve([], environ={"QUANTIZE": "eetq"})["quantize"] == "eetq"
    assert resolve([], environ={})["quantize"] is None


def test_disable_custom_kernels_is_a_switch():
    assert resolve([], environ={})["disable_custom_kernels"] is False
    assert resolve(["--disable-custom-kernels"], environ={})["disable_custom_kernels"] is True
    assert resolve([], environ={"DISABLE_CUSTOM_KERNELS": "true"})["disable_custom_kernels"] is True


def test_hostname_quirk_and_help():
    # HOSTNAME is the machine name in most environments: TGI falls back to 0.0.0.0 when it is not an address
    assert resolve([], environ={"HOSTNAME": "my-box"})["hostname"] == "0.0.0.0"
    assert resolve(["--hostname", "127.0.0.1"], environ={})["hostname"] == "127.0.0.1"
    text = build_parser().format_help()
    assert "--max-batch-prefill-tokens" in text and "[env: MAX_BATCH_PREFILL_TOKENS]" in text


def test_shard_count_follows_tgi():
    assert resolve([], environ={})["num_shard"] == 1
    args = resolve(["--num-shard", "2"], environ={})
    assert args["num_shard"] == 2 and args["local_shards"] == 2
    assert resolve(["--sharded", "true", "--num-shard", "4"], environ={})["num_shard"] == 4
    assert resolve(["--sharded", "false", "--num-shard", "2"], environ={})["num_shard"] == 2  # TGI keeps it too
    env = {"NUM_SHARD": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"}
    args = resolve([], environ=env)
    assert (args["num_shard"], args["master_addr"], args["master_port"]) == (2, "10.0.0.1", 29600)
    assert resolve(["--num-shard", "4", "--local-shards", "2"], environ={})["local_shards"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--sharded", "true"], "`sharded` is true but `num_shard` is not set"),
    (["--sharded", "true", "--num-shard", "1"], "`sharded` is true but `num_shard` <= 1"),
    (["--num-shard", "0"], "`num_shard` cannot be < 1"),
    (["--num-shard", "2", "--local-shards", "3"], "`local_shards` must be between 1 and `num_shard` \\(2\\)"),
])
def test_impossible_shard_settings_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        resolve(argv, environ={})


def test_kernels_switch_off_without_compiling(monkeypatch):
    from loom.layers.kernels import build

    monkeypatch.setenv("LOOM_DISABLE_CPU_KERNELS", "1")
    monkeypatch.setattr(build, "_built", {})
    assert build.load_kernel("loom_never_built", "this is not C++") is None


def test_gpu_only_flags_are_accepted_with_a_note(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        args = resolve(["--cuda-graphs", "1,2,4"], environ={"CUDA_MEMORY_FRACTION": "0.9"})
    assert "quantize" in args  # resolved, not refused
    notes = [r.getMessage() for r in caplog.records]
    assert any("--cuda-graphs=1,2,4 does not apply" in n for n in notes)
    assert any("--cuda-memory-fraction=0.9 does not apply" in n for n in notes)


def test_weights_cache_override_names_the_directory(llama_dir, tmp_path):
    from loom.launcher import resolve_model

    assert resolve_model("org/some-model", None, str(llama_dir)) == ("org/some-model", llama_dir.resolve())
    with pytest.raises(SystemExit, match="no such file or directory"):
        resolve_model("org/some-model", None, str(tmp_path / "missing"))
