"""Finding and loading a model: a local HF directory, a hub id, a preset with dummy weights.

Only safetensors are read (never pickle), and every failure names the file and the problem.
Checkpoint names map onto our fused projections: q/k/v -> qkv_proj, gate/up -> gate_up_proj.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open

from mini_vllm.engine.config import PRESETS, EngineArgs, ModelConfig
from mini_vllm.engine.errors import ModelLoadError
from mini_vllm.engine.model import Attention, CausalLM
from mini_vllm.engine.parallel import TensorParallel, local_config

# checkpoint suffix -> (our parameter suffix, shard index within the fused parameter)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.(weight|bias)$")


@attrs.frozen
class ModelSource:
    """Where a model comes from: a directory with config.json (and weights unless dummy)."""

    name: str
    config: ModelConfig
    directory: Path | None  # None for presets: no files at all
    dummy: bool


def default_cache_dir() -> Path:
    base = os.environ.get("MINI_VLLM_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mini-vllm"


def served_name(args: EngineArgs) -> str:
    """The name a model is served (and picked by clients) under, known without loading it:
    ``model_name``, else "demo", a preset's name, a directory's last component, or the hub id."""
    if args.model_name:
        return args.model_name
    if args.model is None:
        return "demo"
    if args.model in PRESETS:
        return args.model
    path = Path(args.model).expanduser()
    return path.name if path.is_dir() else args.model


def resolve_model(args: EngineArgs) -> ModelSource:
    """Turn ``args.model`` into a config and a directory, building or fetching what is needed."""
    dummy = args.load_format == "dummy"
    model = args.model
    name = served_name(args)
    if model is None:
        from mini_vllm.engine.demo_model import ensure_demo_model

        directory = ensure_demo_model(default_cache_dir())
        return ModelSource(name, ModelConfig.from_file(directory / "config.json"), directory, dummy)
    if model in PRESETS:
        if not dummy:
            raise ModelLoadError(
                f"{model!r} is a preset of shapes only: use load_format='dummy' (random weights) or give a model directory"
            )
        return ModelSource(name, ModelConfig.from_dict(PRESETS[model], model), None, True)
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(name, ModelConfig.from_file(path / "config.json"), path, dummy)
    if path.exists():
        raise ModelLoadError(f"{model}: is a file; give the model's directory (with config.json)")
    directory = _download_from_hub(model, dummy)
    return ModelSource(name, ModelConfig.from_file(directory / "config.json"), directory, dummy)


def _download_from_hub(model_id: str, dummy: bool) -> Path:
    if model_id.count("/") != 1 or model_id.startswith(("/", ".", "~")):
        raise ModelLoadError(f"{model_id}: no such directory, and not a Hugging Face model id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(f"{model_id}: no such directory, and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.txt", "*.model", "*.tiktoken"] + ([] if dummy else ["*.safetensors"])
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as exc:  # the hub raises many kinds (offline, 404, gated): all mean "cannot fetch"
        raise ModelLoadError(
            f"{model_id}: not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: malformed index ({exc})") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{directory}: the index names missing weight file(s): {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickle formats are never loaded, convert to safetensors)" if pickles else ""
        raise ModelLoadError(f"{directory}: no *.safetensors weight files{hint}")
    return files


def _target(name: str) -> tuple[str, int | None] | None:
    """Our parameter name (and fused shard) for a checkpoint tensor name; None to skip it."""
    if name.startswith("model.rotary_emb") or name.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_RE.match(name)
    if m:
        layer, proj, kind = m.groups()
        fused, shard = _FUSED[proj]
        return f"layers.{layer}.{fused}.{kind}", shard
    if name.startswith("model."):
        return name[len("model.") :], None
    if name == "lm_head.weight":
        return name, None
    return name, None


@attrs.frozen
class _Cut:
    """Which part of a checkpoint tensor one rank reads: rows or columns ``[start, start+length)``
    of dimension ``dim``; ``full`` is the whole tensor's shape (checked against the file)."""

    dim: int
    start: int
    length: int
    full: tuple[int, ...]


def _cut(pname: str, shard: int | None, dest: torch.Tensor, tp: TensorParallel, config: ModelConfig) -> _Cut | None:
    """This rank's cut of the tensor loaded into ``dest`` (its local part; ``shard`` its part of a
    fused parameter); ``config`` is the whole model's. None: the tensor is whole on every rank."""
    shape = tuple(dest.shape)
    if pname in ("embed_tokens.weight", "lm_head.weight"):  # vocabulary-parallel, the last range padded
        vocab_size = config.vocab_size
        start, rows = tp.vocab_shard(vocab_size)
        return _Cut(0, start, max(0, min(rows, vocab_size - start)), (vocab_size, *shape[1:]))
    if pname.endswith(("qkv_proj.weight", "qkv_proj.bias")) and shard in (1, 2):  # k or v: whole KV heads
        # Split: kv_heads / N heads; replicated: the one KV head that this rank's query heads use
        # (``TensorParallel.kv_head_shard`` says why that is exact).
        first, count = tp.kv_head_shard(config.num_key_value_heads)
        d = config.head_dim
        return _Cut(0, first * d, count * d, (config.num_key_value_heads * d, *shape[1:]))
    if pname.endswith(("qkv_proj.weight", "qkv_proj.bias", "gate_up_proj.weight")):  # column-parallel
        return _Cut(0, tp.rank * shape[0], shape[0], (shape[0] * tp.size, *shape[1:]))
    if pname.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel
        return _Cut(1, tp.rank * shape[1], shape[1], (shape[0], shape[1] * tp.size))
    return None


def _read_cut(f: Any, name: str, cut: _Cut, file_name: str) -> torch.Tensor:
    """Read only this rank's slice of ``name`` from the file, never the whole tensor."""
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != cut.full:
        raise ModelLoadError(f"{file_name}: tensor {name!r} has shape {shape}, expected {cut.full} from config.json")
    end = cut.start + cut.length
    return sl[cut.start : end] if cut.dim == 0 else sl[:, cut.start : end]


def load_weights(model: CausalLM, directory: Path, full_config: ModelConfig | None = None) -> None:
    """Copy every checkpoint tensor into the model; all parameters must be covered exactly once.

    A tensor-parallel shard (``model.tp``) reads only its slices of the sharded tensors;
    ``full_config`` is then the whole model's config (the shard's own ``model.config`` cannot tell
    how many KV heads a replicated one is taken from). Without it: ``model.config``.
    """
    config = model.config
    whole = config if full_config is None else full_config
    tp = model.tp
    params = dict(model.named_parameters(remove_duplicate=False))
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shard_sizes = {"qkv_proj": [q, kv, kv], "gate_up_proj": [config.intermediate_size] * 2}
    loaded: dict[str, set[int | None]] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    target = _target(name)
                    if target is None:
                        continue
                    pname, shard = target
                    if pname == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    param = params.get(pname)
                    if param is None:
                        raise ModelLoadError(f"{path.name}: unexpected tensor {name!r} for {config.architecture}")
                    dest = param.data
                    if shard is not None:
                        sizes = shard_sizes[pname.split(".")[-2]]
                        start = sum(sizes[:shard])
                        dest = dest.narrow(0, start, sizes[shard])
                    cut = _cut(pname, shard, dest, tp, whole) if tp is not None else None
                    if cut is not None:
                        tensor = _read_cut(f, name, cut, path.name)
                        if cut.length < dest.shape[cut.dim]:  # the padding past the vocabulary: zeros
                            dest.narrow(cut.dim, cut.length, dest.shape[cut.dim] - cut.length).zero_()
                            dest = dest.narrow(cut.dim, 0, cut.length)
                    else:
                        tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(dest.shape):
                        raise ModelLoadError(
                            f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(dest.shape)} from config.json"
                        )
                    dest.copy_(tensor)
                    loaded.setdefault(pname, set()).add(shard)
        except SafetensorError as exc:
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read ({exc})") from None
    missing = []
    for pname, param in params.items():
        if pname == "lm_head.weight" and config.tie_word_embeddings:
            continue
        want: set[int | None] = {None}
        if pname.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            want = {0, 1, 2}
        elif pname.endswith("gate_up_proj.weight"):
            want = {0, 1}
        if loaded.get(pname, set()) != want:
            missing.append(pname)
        del param
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{directory}: checkpoint lacks weights for {shown}")


def _share_replicated_kv(model: CausalLM, tp: TensorParallel, full_config: ModelConfig, seed: int) -> None:
    """Redraw a replicating rank's k/v rows from a stream of its KV head, not of its rank, so the
    ranks holding one KV head hold the same values: otherwise each rank's queries would attend to
    keys and values of its own, a model with ``size`` KV heads rather than the configured ones."""
    head, _ = tp.kv_head_shard(full_config.num_key_value_heads)
    device = next(model.parameters()).device
    # Seeds past every rank's (seed + 7919 * rank, rank < size): no stream is reused.
    gen = torch.Generator(device=device).manual_seed(seed + 7919 * (tp.size + head))
    config = model.config
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    with torch.no_grad():
        for module in model.modules():  # layer order: the same draws on every replica
            if isinstance(module, Attention):
                qkv = module.qkv_proj
                for param in (qkv.weight, qkv.bias):
                    if param is not None:
                        param.narrow(0, q, 2 * kv).uniform_(-0.05, 0.05, generator=gen)


def init_dummy_weights(model: CausalLM, seed: int) -> None:
    """Deterministic small random weights (norms stay at one), enough for realistic timing.

    Drawn on the model's own device: filling 8B parameters on the CPU would take minutes.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.uniform_(-0.05, 0.05, generator=gen)


def build_model(
    source: ModelSource,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    tp: TensorParallel | None = None,
) -> CausalLM:
    """Create the model (with ``tp``: this rank's shard) on ``device`` in ``dtype`` and fill its weights."""
    config = source.config if tp is None else local_config(source.config, tp.size)
    with torch.device("meta"):
        model = CausalLM(config, max_positions, tp)
    model = model.to_empty(device=device).to(dtype)
    # The RoPE tables were on meta: compute them for real, kept in fp32 like transformers does.
    model.rotary = type(model.rotary)(source.config, max_positions).to(device)
    if source.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if source.dummy or source.directory is None:
        # Each rank draws only its shard, from a stream of its own; replicated KV heads from theirs.
        init_dummy_weights(model, seed if tp is None else seed + 7919 * tp.rank)
        if tp is not None and tp.size > source.config.num_key_value_heads:
            _share_replicated_kv(model, tp, source.config, seed)
    else:
        load_weights(model, source.directory, source.config)
    model.eval()
    model.requires_grad_(False)
    return model
