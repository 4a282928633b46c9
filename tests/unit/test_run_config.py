"""The launcher → child run file (run.json): one typed RunConfig, built from the launcher's flags, written as JSON
and read back strictly (a missing, unknown or mistyped key is an error naming it)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from loom import run_config
from loom.config import EngineConfig
from loom.launcher import build_run_config
from loom.launcher_args import resolve
from loom.router.config import RouterConfig
from loom.run_config import EngineSettings, RouterSettings, RunConfig, RunConfigError

ROOT = Path(__file__).resolve().parents[2]


def _config(**overrides) -> RunConfig:
    router = RouterSettings(model_id="org/model", model_dir="/models/m", port=8080, api_key="k",
                            cors_allow_origin=("https://a.example", "https://b.example"), max_input_tokens=100)
    fields = dict(model_dir="/models/m", endpoint="ipc:///tmp/loom-x/engine", router=router,
                  engine=EngineSettings(max_batch_total_tokens=4096, max_batch_size=8), dtype="bfloat16",
                  quantize="eetq", otlp_endpoint="http://localhost:4317", num_shard=2, local_shards=1)
    return RunConfig(**{**fields, **overrides})


def _written(tmp_path: Path, config: RunConfig | None = None) -> dict:
    path = tmp_path / "run.json"
    run_config.dump(config or _config(), path)
    return json.loads(path.read_text())


def _load(tmp_path: Path, data: dict) -> RunConfig:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return run_config.load(path)


def test_round_trip_through_the_file(tmp_path):
    config = _config()
    path = tmp_path / "run.json"
    run_config.dump(config, path)
    assert run_config.load(path) == config
    data = json.loads(path.read_text())  # plain JSON, every field written
    assert set(data) == set(RunConfig.__struct_fields__)
    assert set(data["router"]) == set(RouterSettings.__struct_fields__)
    assert data["router"]["cors_allow_origin"] == ["https://a.example", "https://b.example"]
    assert run_config.load(path).router.cors_allow_origin == ("https://a.example", "https://b.example")


def test_defaults_fill_keys_left_out(tmp_path):
    minimal = {"model_dir": "/m", "endpoint": "ipc:///e", "router": {"model_id": "x", "model_dir": "/m"}}
    loaded = _load(tmp_path, minimal)
    assert loaded.engine == EngineSettings() and loaded.dtype == "auto" and loaded.num_shard == 1
    assert loaded.router.port == 3000 and loaded.router.cors_allow_origin == ()


def test_frozen():
    with pytest.raises(AttributeError):
        _config().port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        _config().router.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("section, key", [(None, "endpoint"), (None, "model_dir"), (None, "router"),
                                          ("router", "model_id")])
def test_missing_required_key_is_named(tmp_path, section, key):
    data = _written(tmp_path)
    del (data[section] if section else data)[key]
    with pytest.raises(RunConfigError, match=rf"run config .*run\.json: .*missing required field `{key}`") as err:
        _load(tmp_path, data)
    if section:
        assert f"$.{section}" in str(err.value)


@pytest.mark.parametrize("section", [None, "router", "engine"])
def test_unknown_key_is_named(tmp_path, section):
    data = _written(tmp_path)
    (data[section] if section else data)["max_batch_sise"] = 1
    with pytest.raises(RunConfigError, match="unknown field `max_batch_sise`") as err:
        _load(tmp_path, data)
    if section:
        assert f"$.{section}" in str(err.value)


def test_wrong_type_is_named(tmp_path):
    data = _written(tmp_path)
    data["engine"]["max_batch_size"] = "8"
    with pytest.raises(RunConfigError, match=r"Expected `int`, got `str` - at `\$\.engine\.max_batch_size`"):
        _load(tmp_path, data)


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(RunConfigError, match="cannot read run config"):
        run_config.load(tmp_path / "missing.json")
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunConfigError, match="run config"):
        run_config.load(tmp_path / "run.json")


def test_child_refuses_a_bad_run_file_with_the_key(tmp_path):
    from loom.cli import main

    data = _written(tmp_path)
    del data["endpoint"]
    (tmp_path / "run.json").write_text(json.dumps(data))
    for command in ("engine", "router"):
        with pytest.raises(SystemExit, match="error: run config .*missing required field `endpoint`"):
            main([command, "--config", str(tmp_path / "run.json")])


def test_launcher_builds_it_from_parsed_flags(tmp_path):
    argv = ["--port", "8080", "--hostname", "127.0.0.1", "--dtype", "float32", "--quantize", "eetq",
            "--max-batch-total-tokens", "8192", "--max-total-tokens", "512", "--max-input-tokens", "400",
            "--cors-allow-origin", "https://a.example", "--cors-allow-origin", "https://b.example",
            "--api-key", "k", "--json-output", "--disable-grammar-support", "--num-shard", "2",
            "--local-shards", "1", "--master-port", "29600", "--graceful-termination-timeout", "10",
            "--otlp-endpoint", "http://localhost:4317"]
    args = resolve(argv, environ={})
    config = build_run_config(args, "org/model", tmp_path / "model", tmp_path / "run")
    assert config.model_dir == str(tmp_path / "model") and config.endpoint == f"ipc://{tmp_path / 'run'}/engine"
    assert config.dtype == "float32" and config.quantize == "eetq" and config.json_output is True
    assert (config.num_shard, config.local_shards, config.master_addr, config.master_port) == (2, 1, "localhost",
                                                                                                29600)
    assert config.graceful_termination_timeout == 10 and config.prometheus_port == 9000
    assert config.otlp_endpoint == "http://localhost:4317"
    assert config.otlp_service_name == "text-generation-inference.router"
    assert config.engine == EngineSettings(max_batch_total_tokens=8192, max_total_tokens=512)  # 256 per step
    r = config.router
    assert (r.model_id, r.model_dir, r.hostname, r.port) == ("org/model", str(tmp_path / "model"), "127.0.0.1", 8080)
    assert r.cors_allow_origin == ("https://a.example", "https://b.example") and r.api_key == "k"
    assert (r.max_input_tokens, r.max_total_tokens) == (400, 512)
    assert r.disable_grammar_support is True and r.enable_prefill_logprobs is False and r.json_output is True
    path = tmp_path / "run.json"
    run_config.dump(config, path)
    assert run_config.load(path) == config


def test_launcher_defaults_match_the_types_defaults(tmp_path):
    """With no flags, the launcher writes TGI's defaults, which are also the defaults of the type."""
    config = build_run_config(resolve([], environ={}), "org/model", tmp_path, tmp_path)
    expected = RunConfig(model_dir=str(tmp_path), endpoint=f"ipc://{tmp_path}/engine",
                         router=RouterSettings(model_id="org/model", model_dir=str(tmp_path)))
    assert config == expected


@pytest.mark.parametrize("section, target", [(EngineSettings, EngineConfig), (RouterSettings, RouterConfig)])
def test_sections_mirror_the_settings_their_process_builds(section, target):
    """The children build EngineConfig / RouterConfig from the sections by name: same names, same defaults."""
    targets = {f.name: f for f in dataclasses.fields(target)}
    for field in msgspec.structs.fields(section):
        assert field.name in targets, f"{section.__name__}.{field.name} is not a field of {target.__name__}"
        ours = _default(field.default, field.default_factory, msgspec.NODEFAULT)
        theirs = _default(targets[field.name].default, targets[field.name].default_factory, dataclasses.MISSING)
        assert ours == theirs, f"{section.__name__}.{field.name}: default {ours!r} != {target.__name__}'s {theirs!r}"


def _default(default, factory, missing):
    if factory is not missing:
        return factory()
    return "(required)" if default is missing else default


def test_children_convert_sections_to_their_settings():
    config = _config()
    router = RouterConfig(**msgspec.structs.asdict(config.router))
    assert router.cors_allow_origin == ("https://a.example", "https://b.example") and router.port == 8080
    engine = EngineConfig(**msgspec.structs.asdict(config.engine))
    assert engine.max_batch_total_tokens == 4096 and engine.max_batch_size == 8 and engine.block_size == 16


def test_run_config_imports_nothing_else_of_loom():
    """Any process (the router included) can read the run file without loading the model stack."""
    code = "import sys, loom.run_config; print(','.join(sorted(m for m in sys.modules if m.startswith('loom'))))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "loom,loom.run_config"
