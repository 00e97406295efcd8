"""Every bad input gives one clear error that names the problem."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mini_vllm.engine import LLM, ConfigError, EngineArgs, InvalidRequest, ModelLoadError, SamplingParams


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"max_tokens": True}, "max_tokens"),
    ],
)
def test_bad_sampling_params(fields: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{names} must be"):
        SamplingParams(**fields)


def test_unknown_sampling_field_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown sampling field.*temprature"):
        SamplingParams.from_dict({"temprature": 1.0})


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 24}, "block_size"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"dtype": "float8"}, "dtype"),
        ({"load_format": "pt"}, "load_format"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"preemption_mode": "drop"}, "preemption_mode"),
        ({"preemption_mode": "swap"}, "preemption_mode"),
        ({"skinny_kernels": "yes"}, "skinny_kernels"),
        ({"programmatic_dependent_launch": 1}, "programmatic_dependent_launch"),
    ],
)
def test_bad_engine_args(fields: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        EngineArgs(**fields)


@pytest.fixture(scope="module")
def demo_llm(demo_model_dir: Path) -> LLM:
    return LLM(num_kv_blocks=32, max_model_len=64)


def test_empty_prompt(demo_llm: LLM) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        demo_llm.generate([[]])
    with pytest.raises(InvalidRequest, match="empty"):
        demo_llm.generate("")


def test_prompt_longer_than_max_model_len(demo_llm: LLM) -> None:
    with pytest.raises(InvalidRequest, match="max_model_len is 64"):
        demo_llm.generate("x" * 64)


def test_token_ids_out_of_vocab(demo_llm: LLM) -> None:
    with pytest.raises(InvalidRequest, match=r"token ids in \[0, 259\) \(the model.s vocabulary\), got \[100000\]"):
        demo_llm.generate([[1, 2, 100000]])


def test_bad_prompt_leaves_no_half_batch(demo_llm: LLM) -> None:
    with pytest.raises(InvalidRequest):
        demo_llm.generate(["fine", ""])
    assert not demo_llm.engine.has_unfinished_requests()


def test_sampling_params_count_must_match(demo_llm: LLM) -> None:
    with pytest.raises(InvalidRequest, match="2 sampling_params for 3 prompts"):
        demo_llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])


def test_dependent_launch_needs_a_recent_gpu(demo_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="programmatic_dependent_launch needs a CUDA GPU of compute capability "
                                          "9.0 or newer, and this engine runs on cpu"):
        LLM(num_kv_blocks=32, max_model_len=64, device="cpu", programmatic_dependent_launch=True)


def test_max_model_len_larger_than_cache(demo_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="does not fit in the KV cache"):
        LLM(num_kv_blocks=2, max_model_len=100)


def test_max_model_len_beyond_model(demo_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        LLM(num_kv_blocks=2, max_model_len=10**6)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_not_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such directory"):
        LLM(str(tmp_path / "nope"))


def test_hub_unreachable_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not be fetched from the Hugging Face hub"):
        LLM("someone/some-model-that-is-not-here")


def test_missing_config(tmp_path: Path, demo_model_dir: Path) -> None:
    d = _copy(demo_model_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        LLM(str(d))


def test_unsupported_architecture(tmp_path: Path, demo_model_dir: Path) -> None:
    d = _copy(demo_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="'GPT2LMHeadModel' is not supported"):
        LLM(str(d))


def test_no_safetensors_and_pickle_refused(tmp_path: Path, demo_model_dir: Path) -> None:
    d = _copy(demo_model_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle formats are never loaded"):
        LLM(str(d))


def test_truncated_safetensors(tmp_path: Path, demo_model_dir: Path) -> None:
    d = _copy(demo_model_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        LLM(str(d))


def test_garbage_safetensors(tmp_path: Path, demo_model_dir: Path) -> None:
    d = _copy(demo_model_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        LLM(str(d))


def test_shape_mismatch(tmp_path: Path, demo_model_dir: Path) -> None:
    d = _copy(demo_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"tensor .model\.layers\.0\.mlp\.\w+_proj\.weight. has shape \(\d+, \d+\), expected .*200.* from config\.json"):
        LLM(str(d))


def test_missing_tensor(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_model("LlamaForCausalLM"), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks weights for layers\.1\.mlp\.gate_up_proj\.weight"):
        LLM(str(d))


def test_preset_needs_dummy_format() -> None:
    with pytest.raises(ModelLoadError, match="load_format='dummy'"):
        LLM("qwen3-0.6b")


@pytest.mark.parametrize("head_dim", [264, 512])
def test_a_head_size_the_gpu_kernels_lack_is_refused_before_loading(head_dim: int) -> None:
    from mini_vllm.engine.attention import GPU_MAX_HEAD_DIM, check_gpu_head_dim

    with pytest.raises(ConfigError, match=rf"head_dim is {head_dim}, .* up to 256: run it with --device cpu"):
        check_gpu_head_dim(head_dim)
    for ok in (8, 24, 40, 80, 96, GPU_MAX_HEAD_DIM):
        check_gpu_head_dim(ok)


def test_an_odd_head_size_is_refused_before_loading() -> None:
    from mini_vllm.engine.attention import check_gpu_head_dim

    with pytest.raises(ConfigError, match="even number"):
        check_gpu_head_dim(25)
