"""Checkpoints on disk: safetensors shards in the Hugging Face hub layout ⇄ a moonlet Transformer.

A checkpoint directory holds ``config.json`` and either one ``model.safetensors`` or shards
``model-00001-of-0000N.safetensors`` listed by ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``). Tensor names are
the hub's (``model.layers.N.self_attn.kv_b_proj.weight`` ...), which are the model's state-dict keys.
One exception: Kimi Linear's checkpoint names its MoE block ``block_sparse_moe`` and the experts'
projections ``w1`` (gate), ``w3`` (up), ``w2`` (down); they are renamed to and from moonlet's
``mlp.experts.E.gate_proj`` ... layout here (``kimi_linear_name`` / ``model_name_of_kimi_linear``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig
from .model.quantized import quantized_modules
from .model.transformer import FP32_TENSORS, Transformer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# safetensors dtype codes of the floating tensors moonlet reads as is (quantization scales)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# load_model(quantized=...): dequantize quantized weights while loading, or keep them as stored
QUANTIZED_MODES = ("dequantize", "keep")
_DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                  "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# K2.5 / K2.6 (model_type kimi_k25) store the text model under this prefix, next to the vision encoder.
TEXT_PREFIX = "language_model."
# Non-text parts of multimodal checkpoints: skipped by load_model (the text model);
# load_vision_language_model reads the K2.5 / K2.6 ones (VISION_PREFIXES) into the vision tower.
_NON_TEXT_PREFIXES = ("vision_tower.", "mm_projector.", "multi_modal_projector.", "vision_model.")
VISION_PREFIXES = ("vision_tower.", "mm_projector.")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Kimi Linear's MoE names: moonlet's model name <-> its checkpoint's.
_KIMI_EXPERT_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_MOE_MODULE_RE = re.compile(r"^(model\.layers\.\d+\.)mlp\.(gate|experts|shared_experts)\.")
_KIMI_MOE_MODULE_RE = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.")
_EXPERT_PROJ_RE = re.compile(r"(\.experts\.\d+\.)(gate_proj|down_proj|up_proj)\.")
_KIMI_EXPERT_PROJ_RE = re.compile(r"(\.experts\.\d+\.)(w1|w2|w3)\.")


def kimi_linear_name(name: str) -> str:
    """The Kimi Linear checkpoint's name for moonlet tensor ``name``
    (``model.layers.3.mlp.experts.7.gate_proj.weight`` -> ``model.layers.3.block_sparse_moe.experts.7.w1.weight``;
    dense layers' ``mlp.*`` and everything else keep their names)."""
    renamed = _MOE_MODULE_RE.sub(r"\1block_sparse_moe.\2.", name)
    if renamed == name:
        return name
    return _EXPERT_PROJ_RE.sub(lambda m: m.group(1) + _KIMI_EXPERT_PROJ[m.group(2)] + ".", renamed)


def model_name_of_kimi_linear(name: str) -> str:
    """The inverse of ``kimi_linear_name``."""
    renamed = _KIMI_MOE_MODULE_RE.sub(r"\1mlp.", name)
    if renamed == name:
        return name
    inverse = {v: k for k, v in _KIMI_EXPERT_PROJ.items()}
    return _KIMI_EXPERT_PROJ_RE.sub(lambda m: m.group(1) + inverse[m.group(2)] + ".", renamed)


def shard_name(index: int, count: int) -> str:
    """File name of shard ``index`` (1-based) of ``count``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _output_tensors(model: Transformer, dtype: torch.dtype, quant, prefix: str):
    """Yield (tensor name, tensor) as the checkpoint stores them, one model tensor at a time, so
    casting or quantizing never holds more than one extra tensor."""
    tied = model.config.tie_word_embeddings
    rename = kimi_linear_name if model.config.model_type == "kimi_linear" else (lambda n: n)
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kept = {n for n, _ in quantized_modules(model)}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # a tied head is the embedding; the hub layout stores it once
        tensor = tensor.detach()
        module, _, attr = name.rpartition(".")
        if module in kept and attr != "bias":
            pieces = {name: tensor}  # kept quantized (load_model(quantized="keep")): the stored bytes
        elif quant is not None and quant.should_quantize(name, linear):
            pieces = quant.quantize(name, tensor, scale_dtype=dtype)
        elif tensor.is_floating_point() and not name.endswith(FP32_TENSORS):
            pieces = {name: tensor.to(dtype)}
        else:
            pieces = {name: tensor}
        for piece_name, piece in pieces.items():
            yield prefix + rename(piece_name), piece.to("cpu").contiguous()


def _vision_tensors(model, dtype: torch.dtype):
    """(name, tensor) of a VisionLanguageModel's vision tower and projector, cast to ``dtype`` and never
    quantized (the published K2.5 checkpoint keeps them in bf16)."""
    for part in ("vision_tower", "mm_projector"):
        for name, tensor in getattr(model, part).state_dict().items():
            tensor = tensor.detach()
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            yield f"{part}.{name}", tensor.to("cpu").contiguous()


def save_model(model: Transformer, directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               dtype: torch.dtype | str | None = None, quantization=None) -> Path:
    """Write ``model`` (a moonlet Transformer) as a hub-layout checkpoint under ``directory``.

    Writes config.json, shards ``model-0000X-of-0000Y.safetensors`` of at most ``max_shard_bytes``
    each (a single tensor larger than that gets its own shard) and ``model.safetensors.index.json``.
    ``dtype`` casts floating tensors while writing (default: the model's dtype; the model itself is
    not changed) and becomes config.json's ``torch_dtype``; the router's ``e_score_correction_bias``
    stays float32. ``quantization`` ("fp8": block FP8 of every linear but lm_head, as K2-Instruct;
    "int4": compressed-tensors INT4 of the routed experts, as K2-Thinking/K2.5; or a
    quantization_config dict) quantizes while writing and records the quantization_config; without
    it the config has none. A kimi_k25 model's tensors get the ``language_model.`` prefix; a
    ``VisionLanguageModel`` also writes its ``vision_tower.*`` and ``mm_projector.*`` tensors (cast to
    ``dtype``, never quantized). Older
    shard files in ``directory`` are removed. Returns the directory.
    """
    from .model.vision import VisionLanguageModel
    from .quant import make_scheme

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive; got {max_shard_bytes}")
    vision_parts = None
    if isinstance(model, VisionLanguageModel):  # the text model as below, plus the vision tensors as they are named
        vision_parts = model
        model = model.language_model
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"save_model needs a moonlet Transformer (with a ModelConfig .config); got {type(model).__name__}")
    out_dtype = resolve_dtype(dtype, config) if dtype is not None else model.dtype
    quant = make_scheme(quantization) if quantization is not None else None
    kept_config = None
    if quantized_modules(model):  # loaded with quantized="keep": written as stored, with its own config
        if quant is not None:
            raise ValueError(f"save_model(quantization={quantization!r}): this model keeps quantized weights "
                             "(load_model(quantized='keep')) and they are written as stored; load it with "
                             "quantized='dequantize' to quantize it differently")
        kept_config = config.quantization_config or (config.outer or {}).get("quantization_config")
    prefix = TEXT_PREFIX if config.outer is not None else ""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    # Stream tensors into shards under temporary names; the final names need the shard count.
    temp_names, weight_map, total = [], {}, 0
    shard: dict[str, torch.Tensor] = {}
    used = 0

    def flush():
        nonlocal shard, used
        temp = directory / f".moonlet-shard-{len(temp_names):05d}.tmp"
        save_file(shard, str(temp), metadata={"format": "pt"})
        temp_names.append(temp)
        for name in shard:
            weight_map[name] = len(temp_names)
        shard, used = {}, 0

    def all_tensors():
        yield from _output_tensors(model, out_dtype, quant, prefix)
        if vision_parts is not None:
            yield from _vision_tensors(vision_parts, out_dtype)

    try:
        for name, tensor in all_tensors():
            size = tensor.numel() * tensor.element_size()
            if shard and used + size > max_shard_bytes:
                flush()
            shard[name] = tensor
            used += size
            total += size
        if shard or not temp_names:
            flush()
    except BaseException:
        for temp in temp_names:  # leave the directory as it was
            temp.unlink(missing_ok=True)
        raise

    count = len(temp_names)
    names = [shard_name(i + 1, count) for i in range(count)]
    for old in directory.iterdir():
        if (old.name == SINGLE_NAME or _SHARD_RE.match(old.name)) and old.name not in names:
            old.unlink()
    for temp, final in zip(temp_names, names):
        os.replace(temp, directory / final)
    index = {"metadata": {"total_size": total},
             "weight_map": {name: names[i - 1] for name, i in weight_map.items()}}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    out_config = config.replace(torch_dtype=_DTYPE_NAMES[out_dtype], extra=dict(config.extra),
                                outer=None if config.outer is None else dict(config.outer),
                                quantization_config=quant.config_dict() if quant is not None else kept_config)
    out_config.extra.pop("dtype", None)  # transformers 5's spelling of torch_dtype would contradict it
    if out_config.outer is not None:
        out_config.outer.pop("quantization_config", None)
    out_config.save_pretrained(directory)
    return directory


# ---- loading --------------------------------------------------------------------------------------

class Checkpoint:
    """The tensors of one checkpoint directory: name -> shard file, read lazily with ``safe_open``.

    ``path`` is a directory holding ``model.safetensors.index.json`` or a single ``model.safetensors``
    (or the path of that index or single file).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_file():
            directory = path.parent
            index_path = path if path.name.endswith(".json") else None
            single = None if index_path else path
        else:
            directory = path
            index_path = path / INDEX_NAME if (path / INDEX_NAME).is_file() else None
            single = path / SINGLE_NAME if index_path is None and (path / SINGLE_NAME).is_file() else None
        if not directory.is_dir():
            raise FileNotFoundError(f"no checkpoint at {path}: give a directory holding config.json and safetensors")
        self.directory = directory
        self.files: dict[str, str] = {}  # tensor name -> file name inside directory
        if index_path is not None:
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path} is not a safetensors index (needs a 'weight_map'): {e}") from e
            missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index_path} lists shard files that are not in {directory}: "
                                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            self.files = dict(weight_map)
        elif single is not None:
            with safe_open(str(single), framework="pt") as f:
                self.files = {name: single.name for name in f.keys()}
        else:
            found = sorted(p.name for p in directory.glob("*.safetensors"))
            raise FileNotFoundError(
                f"no {INDEX_NAME} or {SINGLE_NAME} in {directory}"
                + (f" (found {', '.join(found[:5])}; an index is needed to read several shards)" if found else "")
            )
        self._handles: dict[str, object] = {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for file_name in list(self._handles):
            self.release(file_name)

    def release(self, file_name: str) -> None:
        """Close one file: its mapping (and the page-cache pages it keeps resident) goes away."""
        handle = self._handles.pop(file_name, None)
        if handle is not None:
            handle.__exit__(None, None, None)

    def _open(self, file_name: str):
        if file_name not in self._handles:
            handle = safe_open(str(self.directory / file_name), framework="pt")
            self._handles[file_name] = handle.__enter__()
        return self._handles[file_name]

    def file_of(self, name: str) -> str:
        return self.files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.files[name]).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype code (``BF16``, ``F8_E4M3``, ``I32`` ...)."""
        return self._open(self.files[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        """The tensor on CPU. It may share memory with the file's mapping: copy before keeping it."""
        return self._open(self.files[name]).get_tensor(name)



@dataclass
class _Entry:
    """How one model tensor is stored: its checkpoint tensors (role -> checkpoint name) and format."""
    name: str  # model state-dict key
    kind: str  # "plain" | quantization kind from moonlet.quant
    parts: dict[str, str] = field(default_factory=dict)


def _canonical_name(raw: str, config: ModelConfig, mtp: bool = False) -> str | None:
    """The model name of checkpoint tensor ``raw``, or None when the loader skips it. ``mtp``: name
    the multi-token-prediction layers' tensors only (``moonlet.model.mtp.MTPHead``, with their copy
    of the embedding)."""
    name = raw[len(TEXT_PREFIX):] if raw.startswith(TEXT_PREFIX) else raw
    if name.startswith(_NON_TEXT_PREFIXES) or name.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_RE.match(name)
    is_mtp = False
    if m:
        layer = int(m.group(1))
        mtp_layers = max(config.num_nextn_predict_layers or 0, 1)
        is_mtp = config.num_hidden_layers <= layer < config.num_hidden_layers + mtp_layers
    if mtp:
        return name if is_mtp else None
    if is_mtp:
        return None  # DeepSeek's multi-token-prediction module: not part of the decoder
    if config.model_type == "kimi_linear":
        return model_name_of_kimi_linear(name)
    return name


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    """The dtype the loaded model runs in: ``dtype`` if given, else the checkpoint's own
    (``torch_dtype``, or transformers 5's ``dtype``; bfloat16 when neither is set)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; moonlet runs in float32, bfloat16 or float16")
        return dtype
    if dtype is None or dtype == "auto":
        dtype = config.extra.get("dtype") or config.torch_dtype or "bfloat16"
        source = "the checkpoint's config.json"
    else:
        source = "the dtype argument"
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unsupported dtype {dtype!r} from {source}; use float32, bfloat16 or float16")
    return _DTYPE_ALIASES[key]


def _plan_entries(model: Transformer, ckpt: Checkpoint, config: ModelConfig, quant, mtp: bool = False) -> list[_Entry]:
    """Match every model tensor with its checkpoint tensors and check names and shapes before reading
    any data; raise naming every missing or unexpected tensor, or the first mis-shaped one. ``mtp``:
    the model is an ``MTPHead`` and only the MTP layers' tensors count."""
    by_model_name: dict[str, str] = {}
    for raw in ckpt.files:
        name = _canonical_name(raw, config, mtp)
        if name is not None:
            by_model_name[name] = raw
    model_name_of = {raw: name for name, raw in by_model_name.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = config.tie_word_embeddings and not mtp
    entries, used, missing = [], set(), []
    for name, shape in expected.items():
        if tied and name == "lm_head.weight":
            if name in by_model_name:
                used.add(name)  # some writers store the tied head anyway; the embedding wins
            continue
        entry = quant.match(name, by_model_name) if quant is not None else None
        if entry is None and name in by_model_name:
            entry = _Entry(name, "plain", {"weight": by_model_name[name]})
        if entry is None:
            missing.append(name)
            continue
        used.update(model_name_of[raw] for raw in entry.parts.values())
        _check_shapes(entry, shape, ckpt, quant)
        entries.append(entry)
    unexpected = sorted(set(by_model_name) - used)
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} tensor(s) the model needs are not in the checkpoint: "
                         + _first_names(missing))
        if unexpected:
            lines.append(f"{len(unexpected)} checkpoint tensor(s) the model has no place for: "
                         + _first_names([f"{by_model_name[u]} (in {ckpt.file_of(by_model_name[u])})"
                                         for u in unexpected[:_NAMES_SHOWN + 1]]))
        raise ValueError(f"checkpoint {ckpt.directory} does not match its config.json: " + "; ".join(lines)
                         + ". Check that config.json belongs to these weights.")
    return entries


_NAMES_SHOWN = 8


def _first_names(names: list[str]) -> str:
    """The first few of ``names`` joined for an error message, with " ..." when there are more."""
    return ", ".join(names[:_NAMES_SHOWN]) + (" ..." if len(names) > _NAMES_SHOWN else "")


def _check_shapes(entry: _Entry, shape: tuple[int, ...], ckpt: Checkpoint, quant) -> None:
    if entry.kind == "plain":
        raw = entry.parts["weight"]
        found = ckpt.shape(raw)
        if found != shape:
            raise ValueError(f"tensor {raw!r} in {ckpt.file_of(raw)} has shape {list(found)}; "
                             f"the model expects {list(shape)} (from config.json)")
    else:
        quant.check_shapes(entry, shape, ckpt)


def _owned(src: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``src`` (read from a file mapping) on ``device`` in ``dtype`` (None: its own), in memory of its own
    and contiguous: the file may be rewritten while the model lives."""
    out = src.to(device=device, dtype=dtype or src.dtype)
    if out.data_ptr() == src.data_ptr() or not out.is_contiguous():
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def _materialize(entry: _Entry, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, quant,
                 shard=None) -> torch.Tensor:
    """The entry's tensor on ``device`` in its run dtype; with a ``moonlet.parallel.Shard`` that names a
    dimension, only that slice (a plain tensor is sliced before it is copied)."""
    target = torch.float32 if entry.name.endswith(FP32_TENSORS) else dtype
    part = shard is not None and shard.dim is not None
    if entry.kind == "plain":
        src = ckpt.get(entry.parts["weight"])
        return _owned(src.narrow(shard.dim, shard.start, shard.size) if part else src, device, target)
    out = quant.dequantize(entry, ckpt, device, target)
    return out.narrow(shard.dim, shard.start, shard.size).clone() if part else out


def _keep_quantized(model: Transformer, entries: list[_Entry], quant, ckpt: Checkpoint) -> None:
    """Replace (on the meta model) each linear whose weight the checkpoint stores quantized by the
    quantized module of its scheme (``moonlet.model.quantized``), named as the checkpoint names it."""
    for entry in entries:
        if entry.kind == "plain":
            continue
        module_name = entry.name.rpartition(".")[0]
        linear = model.get_submodule(module_name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{entry.name} is stored quantized but {module_name} is a {type(linear).__name__}, "
                             "not a linear layer; load with quantized='dequantize'")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quant.kept_module(linear, entry, ckpt))


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(f"model has no tensor {name!r}")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None, quantized: str = "dequantize",
               tensor_parallel=None, lora: str | os.PathLike | None = None) -> Transformer:
    """Load a checkpoint directory (config.json + safetensors) as a moonlet Transformer in eval mode.

    Reads model_type kimi_k2, kimi_k25 (the text model; ``language_model.`` prefixes and vision
    tensors are handled), deepseek_v3, deepseek_v2 and kimi_linear (its MoE names mapped); sharded (index) or single-file checkpoints;
    bf16/fp32 weights, block-FP8 and compressed-tensors INT4 (dequantized while loading, or kept: see
    ``quantized`` below). MTP layers
    and stray ``rotary_emb.inv_freq`` tensors are skipped. The model is built on the meta device and
    each tensor is materialized once, directly in its final dtype on ``device``, shard by shard,
    so host memory peaks near the model's size plus one tensor.

    ``dtype``: None (or "auto") keeps the checkpoint's dtype (config.json ``torch_dtype``) on every
    device, CPU included; pass torch.float32 for faster, more exact CPU runs of small models. The
    router's ``e_score_correction_bias`` stays float32.

    ``quantized``: "dequantize" (default) turns block-FP8 / INT4 weights into ``dtype`` weights while
    loading; "keep" builds ``Fp8BlockLinear`` / ``Int4GroupLinear`` (``moonlet.model.quantized``) for
    the linears the checkpoint stores quantized and gives them the file's tensors byte for byte (their
    names are the checkpoint's); everything else is loaded as usual. A plain checkpoint loads the same
    either way.

    ``tensor_parallel`` (a ``moonlet.parallel.TensorParallel`` of more than one rank): load this rank's
    part of the model (``moonlet.parallel.shard_transformer``). The whole checkpoint is checked against
    config.json as always, but only this rank's tensors are read: its experts (kept quantized with
    "keep"), its slices of the split matrices (a quantized one is dequantized, then sliced), and the
    replicated rest.

    ``lora``: a PEFT LoRA adapter directory (``moonlet.model.lora``) merged into the loaded weights
    (W += alpha/r · B A, in float32). Its modules must be dense linears of this model with matching
    shapes (ValueError otherwise, before any weight changes); weights kept quantized are refused
    (load with quantized="dequantize"), and so is tensor parallelism (merge into a full checkpoint
    first and serve that).
    """
    from .quant import scheme_for  # quant imports this module's Checkpoint helpers lazily

    if quantized not in QUANTIZED_MODES:
        raise ValueError(f"load_model(quantized={quantized!r}): use one of {', '.join(QUANTIZED_MODES)}")
    if lora is not None:
        from .model.lora import read_adapter

        if tensor_parallel is not None and tensor_parallel.world_size > 1:
            raise ValueError(f"load_model(lora={str(lora)!r}) with tensor parallelism: each rank loads only its "
                             "slices, so the adapter cannot be merged before sharding; merge it into a full "
                             "checkpoint first (moonlet.model.lora.merge_adapter + save_model) and serve that")
        read_adapter(lora)  # a bad adapter directory fails before the (long) load
    path = Path(path)
    directory = path.parent if path.is_file() else path
    config = ModelConfig.from_pretrained(directory)
    device = torch.device(device)
    run_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Transformer(config)
    with Checkpoint(path) as ckpt:
        quant = scheme_for(config, ckpt, model)
        entries = _plan_entries(model, ckpt, config, quant)
        if hasattr(quant, "check_placement"):
            quant.check_placement(entries, {n for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        keep = quantized == "keep" and quant is not None
        if keep:
            _keep_quantized(model, entries, quant, ckpt)
        targets = {entry.name: [(entry.name, None)] for entry in entries}
        if tensor_parallel is not None and tensor_parallel.world_size > 1:
            from .parallel import shard_transformer

            shards = shard_transformer(model, tensor_parallel)
            by_source: dict[str, list] = {}
            for local, shard in shards.items():
                by_source.setdefault(shard.source, []).append((local, shard))
            # split or renamed tensors from their shards; routed experts no shard names belong to other
            # ranks (not read); the rest is replicated under its own name
            targets = {e.name: by_source.get(e.name, [] if ".mlp.experts." in e.name else [(e.name, None)])
                       for e in entries}
            entries = [entry for entry in entries if targets[entry.name]]
        by_file: dict[str, list[_Entry]] = {}
        for entry in entries:
            by_file.setdefault(ckpt.file_of(next(iter(entry.parts.values()))), []).append(entry)
        ckpt.close()  # planning touched only headers; reopen shard by shard below
        with torch.no_grad():
            for file_name in sorted(by_file):
                for entry in by_file[file_name]:
                    for local, shard in targets[entry.name]:
                        if keep and entry.kind != "plain" and (shard is None or shard.dim is None):
                            module_name = local.rpartition(".")[0]
                            for attr, raw in quant.kept_parts(entry).items():
                                _assign(model, f"{module_name}.{attr}", _owned(ckpt.get(raw), device))
                        else:
                            _assign(model, local, _materialize(entry, ckpt, device, run_dtype, quant, shard))
                ckpt.close()  # unmap this shard (and any companion file) before the next
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    rotary.inv_freq = torch.empty(rotary.inv_freq.shape, device=device)  # reset_buffers fills it on this device
    model.reset_buffers()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left unloaded: {', '.join(left[:8])}")
    if lora is not None:
        from .model.lora import merge_adapter

        merge_adapter(model, lora)
    return model.eval()


MTP_FILE = "model-mtp.safetensors"


def load_mtp(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """The checkpoint's multi-token-prediction layers (DeepSeek-V3's ``model.layers.{N}.*`` for
    ``num_nextn_predict_layers`` > 0) as a ``moonlet.model.mtp.MTPHead`` in eval mode; block-FP8 /
    INT4 tensors are dequantized. ValueError when the config has none or tensors are missing."""
    from .model.mtp import MTPHead
    from .quant import scheme_for

    path = Path(path)
    directory = path.parent if path.is_file() else path
    config = ModelConfig.from_pretrained(directory)
    if not config.num_nextn_predict_layers:
        raise ValueError(f"{directory}: config.json has no multi-token-prediction layers "
                         "(num_nextn_predict_layers is 0 or missing); speculative='mtp' needs a checkpoint that "
                         "ships them (DeepSeek-V3 does; Kimi K2 does not)")
    device = torch.device(device)
    run_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        head = MTPHead(config)
    with Checkpoint(path) as ckpt:
        quant = scheme_for(config, ckpt, head)
        entries = _plan_entries(head, ckpt, config, quant, mtp=True)
        with torch.no_grad():
            for entry in entries:
                _assign(head, entry.name, _materialize(entry, ckpt, device, run_dtype, quant))
    left = [n for n, t in list(head.named_parameters()) + list(head.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: MTP tensors left unloaded: {', '.join(left[:8])}")
    return head.eval()


def save_mtp(head, model: Transformer, directory: str | os.PathLike) -> Path:
    """Add MTP layers (an ``MTPHead`` for ``model``) to the checkpoint ``save_model`` wrote in
    ``directory``: their tensors, with the embedding copy DeepSeek-V3 stores under each layer (set to
    ``model``'s), go to
    ``model-mtp.safetensors``, listed in the index; config.json gets ``num_nextn_predict_layers``."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    index = json.loads(index_path.read_text(encoding="utf-8"))
    with torch.no_grad():
        for layer in head.layers:  # the copy of the embedding DeepSeek-V3 stores with each MTP layer
            layer.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in head.state_dict().items()}
    save_file(tensors, str(directory / MTP_FILE), metadata={"format": "pt"})
    for name, t in tensors.items():
        index["weight_map"][name] = MTP_FILE
        index.setdefault("metadata", {})["total_size"] = index.get("metadata", {}).get("total_size", 0) + \
            t.numel() * t.element_size()
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    config_path = directory / "config.json"
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    cfg["num_nextn_predict_layers"] = len(head.layer_ids)
    config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return directory


def load_vision_language_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                               dtype: torch.dtype | str | None = None, quantized: str = "dequantize",
                               tensor_parallel=None, lora: str | os.PathLike | None = None):
    """Load a kimi_k25 (K2.5 / K2.6) checkpoint with its vision encoder: a ``VisionLanguageModel`` whose
    ``language_model`` is what ``load_model`` returns and whose ``vision_tower`` and ``mm_projector`` hold
    the checkpoint's ``vision_tower.*`` / ``mm_projector.*`` tensors, in the same dtype on ``device``.

    The vision tensors must match config.json's ``vision_config`` exactly: every missing, unexpected or
    mis-shaped one is an error naming it. They are read as stored (bf16/fp32/fp16), not dequantized.
    ``quantized`` is ``load_model``'s, for the text model. ``tensor_parallel``: the text model is this
    rank's share (``load_model``); the vision encoder is whole. ``lora``: an adapter of the text model,
    merged as ``load_model`` does.
    """
    from .model.vision import VisionLanguageModel

    path = Path(path)
    directory = path.parent if path.is_file() else path
    config = ModelConfig.from_pretrained(directory)
    if config.vision_config is None:
        raise ValueError(f"{directory / 'config.json'} has no vision_config: it is not a kimi_k25 (K2.5 / K2.6) "
                         "image-text checkpoint; use load_model for the text model")
    language_model = load_model(path, device=device, dtype=dtype, quantized=quantized,
                                tensor_parallel=tensor_parallel, lora=lora)
    run_dtype = language_model.dtype
    device = torch.device(device)
    with torch.device("meta"):
        model = VisionLanguageModel(language_model.config, language_model=nn.Identity())
    model.language_model = language_model
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(VISION_PREFIXES)}
    with Checkpoint(path) as ckpt:
        present = {name for name in ckpt.files if name.startswith(VISION_PREFIXES)}
        missing = sorted(set(expected) - present)
        unexpected = sorted(present - set(expected))
        if missing or unexpected:
            lines = []
            if missing:
                lines.append(f"{len(missing)} vision tensor(s) the model needs are not in the checkpoint: "
                             + _first_names(missing))
            if unexpected:
                lines.append(f"{len(unexpected)} vision tensor(s) the model has no place for: "
                             + _first_names(unexpected))
            raise ValueError(f"checkpoint {ckpt.directory} does not match its vision_config: " + "; ".join(lines)
                             + ". Check that config.json's vision_config belongs to these weights.")
        entries = [_Entry(name, "plain", {"weight": name}) for name in sorted(expected)]
        for entry in entries:
            if ckpt.dtype_name(entry.name) not in ("BF16", "F16", "F32"):
                raise ValueError(f"vision tensor {entry.name!r} is stored as {ckpt.dtype_name(entry.name)}; moonlet "
                                 "reads the vision encoder in bf16, fp16 or fp32 only")
            _check_shapes(entry, expected[entry.name], ckpt, None)
        with torch.no_grad():
            for entry in entries:
                _assign(model, entry.name, _materialize(entry, ckpt, device, run_dtype, None))
    left = [n for n, t in model.named_parameters() if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: vision tensors left unloaded: {', '.join(left[:8])}")
    return model.eval()
