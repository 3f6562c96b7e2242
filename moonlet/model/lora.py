"""LoRA: low-rank adapters on a Transformer's linear layers, in the PEFT adapter format.

A wrapped linear computes ``W x + b + (alpha / r) * B(A(dropout(x)))`` with ``A`` [r, in] and ``B``
[out, r]. As PEFT initializes them, ``A`` is Kaiming-uniform (a = sqrt(5), what ``nn.Linear`` itself
uses) and ``B`` is zero, so a fresh adapter leaves the model's function unchanged.

:class:`LoraLinear` is an ``nn.Linear`` that keeps the base layer's own ``weight`` / ``bias``
Parameters under their own names and adds ``lora_A`` / ``lora_B`` submodules, so the base model's
state-dict names do not change (``model.layers.0.self_attn.q_a_proj.weight``) and the adapter's are
``...q_a_proj.lora_A.weight``: PEFT's names without its ``base_model.model.`` prefix.

On disk an adapter is a directory with ``adapter_config.json`` (peft_type "LORA", r, lora_alpha,
lora_dropout, target_modules, ...) and ``adapter_model.safetensors`` holding
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``: what PEFT's
``save_pretrained`` writes for a ``PeftModel`` over the transformers model of the same checkpoint,
and what ``PeftModel.from_pretrained`` reads. Routed experts are LoRA targets only with
``experts=True`` (there are many of them); such adapters name ``mlp.experts.E.gate_proj`` ... per
expert, which transformers 5 (experts fused into 3-D parameters) cannot take.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# MLA's projections (q_proj without q-LoRA) and the SwiGLU projections of dense MLPs and shared experts
DEFAULT_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")
_EXPERT_RE = re.compile(r"\.mlp\.experts\.\d+\.")
# PEFT's exclude_modules (a full-match regex) for adapters that leave the routed experts alone
EXPERTS_EXCLUDE = r".*\.mlp\.experts\.\d+\..*"
_LORA_NAME_RE = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$")


@dataclass
class LoraSettings:
    """What to adapt and how: rank ``r``, ``alpha`` (the update is scaled by alpha / r), ``dropout`` on
    the adapter's input while training, ``targets`` (module-name suffixes: a linear whose name is the
    target or ends with "." + target), ``experts`` (also the routed experts' projections)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    experts: bool = False
    base_model_name_or_path: str | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> "LoraSettings":
        """From TrainConfig.lora ({r, alpha, dropout, targets, experts}); unknown keys are an error."""
        data = dict(data or {})
        known = {"r", "alpha", "dropout", "targets", "experts"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown lora keys {unknown}; known keys: {sorted(known)}")
        if "targets" in data:
            data["targets"] = tuple(data["targets"])
        settings = cls(**data)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r={self.r!r} must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout={self.dropout!r} must be in [0, 1)")
        if not self.targets or any(not isinstance(t, str) or not t for t in self.targets):
            raise ValueError(f"lora targets={self.targets!r} must be a non-empty list of module-name suffixes")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Linear):
    """A linear layer plus a low-rank update. Holds the base layer's ``weight`` and ``bias`` Parameters
    themselves (not copies), so freezing, saving and merging act on the model's own tensors."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            a = torch.empty(r, self.in_features, dtype=torch.float32)
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), ..)
            a.uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
        return out + (self.scaling * update).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A in float32: what merging adds to ``weight``."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def target_names(model: nn.Module, targets, experts: bool = False) -> list[str]:
    """The names of the plain ``nn.Linear`` modules of ``model`` that ``targets`` (suffixes) select;
    routed experts only with ``experts``. ValueError for a target that selects nothing, or one that
    names a module that is not a plain linear (a quantized layer: merge needs dense weights)."""
    from .quantized import QuantizedLinear

    chosen, used = [], set()
    for name, module in model.named_modules():
        if not _matches(name, targets):
            continue
        if _EXPERT_RE.search("." + name) and not experts:
            used.update(t for t in targets if name == t or name.endswith("." + t))
            continue
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"LoRA target {name} is a quantized layer ({type(module).__name__}); LoRA needs dense "
                             "weights: load the model with quantized='dequantize'")
        if isinstance(module, LoraLinear):
            raise ValueError(f"{name} already has a LoRA adapter; merge_lora or remove it before adding another")
        if type(module) is not nn.Linear:
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer; choose "
                             "linear projections such as q_a_proj, kv_b_proj, o_proj, gate_proj")
        used.update(t for t in targets if name == t or name.endswith("." + t))
        chosen.append(name)
    unknown = [t for t in targets if t not in used]
    # q_proj and q_a_proj/q_b_proj are alternatives (with or without q-LoRA): a default target the
    # model does not have is fine, one the caller named is not
    unknown = [t for t in unknown if not (tuple(targets) == DEFAULT_TARGETS and t in DEFAULT_TARGETS)]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} match no linear layer of this model; targets are module-name "
                         f"suffixes such as {', '.join(DEFAULT_TARGETS)}")
    if not chosen:
        raise ValueError(f"LoRA targets {list(targets)} select no linear layer of this model")
    return chosen


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def add_lora(model: nn.Module, settings: LoraSettings, seed: int = 0) -> list[str]:
    """Wrap the selected linears of ``model`` in :class:`LoraLinear` (A random, B zero: the model's
    function is unchanged). Returns the wrapped modules' names. Does not freeze anything: see
    :func:`freeze_base`."""
    settings.validate()
    names = target_names(model, settings.targets, settings.experts)
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        base = model.get_submodule(name)
        _set_module(model, name, LoraLinear(base, settings.r, settings.alpha, settings.dropout, gen))
    model.lora_settings = settings
    return names


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def freeze_base(model: nn.Module) -> list[nn.Parameter]:
    """requires_grad False for every parameter but the LoRA factors; returns the LoRA parameters."""
    trainable = []
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(is_lora)
        if is_lora:
            trainable.append(p)
    return trainable


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha/r) B A, computed in float32) and put the
    plain ``nn.Linear`` back, holding the same Parameters. Returns ``model``."""
    for name, m in lora_modules(model).items():
        merged = (m.weight.float() + m.delta_weight()).to(m.weight.dtype)
        m.weight.copy_(merged)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _set_module(model, name, plain)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their moonlet names (``<module>.lora_A.weight`` ...)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s adapter as PEFT does: adapter_config.json + adapter_model.safetensors
    (``base_model.model.<module>.lora_A.weight`` ...; Kimi Linear models under their checkpoint's MoE
    names). ``dtype``: the stored dtype (default: the factors' own)."""
    from safetensors.torch import save_file

    from ..weights import kimi_linear_name

    settings: LoraSettings | None = getattr(model, "lora_settings", None)
    modules = lora_modules(model)
    if settings is None or not modules:
        raise ValueError("this model has no LoRA adapter to save (add_lora or load_adapter first)")
    rename = kimi_linear_name if _model_type(model) == "kimi_linear" else (lambda n: n)
    tensors = {}
    for name, t in lora_state_dict(model).items():
        t = t.to(dtype) if dtype is not None else t
        tensors[PEFT_PREFIX + rename(name)] = t.contiguous().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    has_experts = any(_EXPERT_RE.search("." + n) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout, "target_modules": sorted(settings.targets),
        "exclude_modules": EXPERTS_EXCLUDE if has_experts and not settings.experts else None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or settings.base_model_name_or_path,
    }
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


@dataclass
class Adapter:
    """An adapter read from disk: its settings and its factors by moonlet module name
    (``{module: (A [r, in], B [out, r])}``), with the scaling per module (rslora: alpha / sqrt(r))."""
    settings: LoraSettings
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float] = field(default_factory=dict)


def read_adapter(directory: str | os.PathLike, model_type: str | None = None) -> Adapter:
    """Read a PEFT LoRA adapter directory. ValueError (naming what and why) for a missing or unreadable
    config or weights file, another PEFT method, or features moonlet does not merge (DoRA, trained
    biases, modules_to_save, fan_in_fan_out)."""
    from safetensors.torch import load_file

    from ..weights import model_name_of_kimi_linear

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    if not directory.is_dir() or not config_path.is_file():
        raise ValueError(f"LoRA adapter {str(directory)!r}: no {ADAPTER_CONFIG_NAME} there; give a PEFT adapter "
                         f"directory ({ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME})")
    if not weights_path.is_file():
        hint = " (adapter_model.bin, a pickle, is not read: re-save with safetensors)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise ValueError(f"LoRA adapter {str(directory)!r}: no {ADAPTER_WEIGHTS_NAME}{hint}")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"LoRA adapter {config_path} is not valid JSON: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {str(directory)!r} is peft_type {cfg.get('peft_type')!r}; only LORA adapters "
                         "can be merged")
    unsupported = {"use_dora": bool(cfg.get("use_dora")), "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
                   # PEFT over transformers 5 puts LoRA on fused 3-D expert parameters (gate_up_proj ...)
                   "target_parameters": bool(cfg.get("target_parameters")),
                   "modules_to_save": bool(cfg.get("modules_to_save")),
                   "bias": cfg.get("bias", "none") not in (None, "none")}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"LoRA adapter {str(directory)!r} uses {', '.join(bad)} ({', '.join(f'{k}={cfg.get(k)!r}' for k in bad)}), "
                         "which moonlet does not merge; plain LoRA factors (bias 'none') only")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    tensors = load_file(str(weights_path))
    rename = model_name_of_kimi_linear if model_type == "kimi_linear" else (lambda n: n)
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for raw, t in tensors.items():
        name = raw[len(PEFT_PREFIX):] if raw.startswith(PEFT_PREFIX) else raw
        if name.startswith("language_model."):  # K2.5 / K2.6: the text model's adapter
            name = name[len("language_model."):]
        m = _LORA_NAME_RE.match(name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."))
        if m is None:
            raise ValueError(f"LoRA adapter {str(directory)!r}: tensor {raw!r} is not a LoRA factor "
                             "(expected <module>.lora_A.weight / <module>.lora_B.weight)")
        pieces.setdefault(rename(m.group(1) + ".weight")[:-len(".weight")], {})[m.group(2)] = t
    factors, scaling = {}, {}
    for module, parts in sorted(pieces.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {str(directory)!r}: {module} has only {sorted(parts)}; both lora_A and "
                             "lora_B are needed")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA adapter {str(directory)!r}: {module} has lora_A {list(a.shape)} and lora_B "
                             f"{list(b.shape)}; expected [r, in] and [out, r]")
        rank = a.shape[0]
        key_r = next((int(v) for k, v in rank_pattern.items() if module == k or module.endswith("." + k)), r)
        key_alpha = next((float(v) for k, v in alpha_pattern.items() if module == k or module.endswith("." + k)), alpha)
        if rank != key_r:
            raise ValueError(f"LoRA adapter {str(directory)!r}: {module} has rank {rank} but the config says "
                             f"r={key_r}")
        factors[module] = (a, b)
        scaling[module] = key_alpha / math.sqrt(rank) if rslora else key_alpha / rank
    if not factors:
        raise ValueError(f"LoRA adapter {str(directory)!r} holds no LoRA factors")
    targets = cfg.get("target_modules") or []
    settings = LoraSettings(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                            targets=tuple([targets] if isinstance(targets, str) else targets),
                            experts=any(_EXPERT_RE.search("." + m) for m in factors),
                            base_model_name_or_path=cfg.get("base_model_name_or_path"))
    return Adapter(settings, factors, scaling)


def _check_adapter(model: nn.Module, adapter: Adapter, source: str) -> None:
    from .quantized import QuantizedLinear

    for module, (a, b) in adapter.factors.items():
        try:
            linear = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"LoRA adapter {source}: {module} is not a module of this model "
                             f"({getattr(getattr(model, 'config', None), 'model_type', 'model')}); the adapter was "
                             "made for another architecture or size") from None
        if isinstance(linear, QuantizedLinear):
            raise ValueError(f"LoRA adapter {source}: {module} is kept quantized ({type(linear).__name__}); merging "
                             "needs dense weights: load with quantized='dequantize' (engine: quantization="
                             "'dequantize', CLI --quantization dequantize)")
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LoRA adapter {source}: {module} is a {type(linear).__name__}, not a linear layer")
        if linear.weight.is_meta:
            raise ValueError(f"LoRA adapter {source}: {module} is not loaded on this rank")
        want_a, want_b = (a.shape[0], linear.in_features), (linear.out_features, a.shape[0])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"LoRA adapter {source}: {module} has lora_A {list(a.shape)}, lora_B {list(b.shape)}; "
                             f"this model's {module} is [{linear.out_features}, {linear.in_features}], so they must "
                             f"be {list(want_a)} and {list(want_b)} (an adapter for another model size?)")


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: str | os.PathLike | Adapter) -> nn.Module:
    """Fold a PEFT LoRA adapter (a directory or a read :class:`Adapter`) into ``model``'s dense weights:
    W += scaling * B A, in float32, rounded once to W's dtype. Every module is checked first (exists,
    a dense linear, shapes), so a bad adapter changes nothing. Returns ``model``."""
    source = repr(str(adapter)) if not isinstance(adapter, Adapter) else "(in memory)"
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter, _model_type(model))
    _check_adapter(model, adapter, source)
    for module, (a, b) in adapter.factors.items():
        w = model.get_submodule(module).weight
        delta = adapter.scaling[module] * (b.to(w.device).float() @ a.to(w.device).float())
        w.copy_((w.float() + delta).to(w.dtype))
    return model


@torch.no_grad()
def load_adapter(model: nn.Module, adapter: str | os.PathLike, trainable: bool = True) -> list[str]:
    """Wrap ``model`` with the adapter's modules (:class:`LoraLinear`) holding its factors, unmerged (to
    train on, e.g. resuming). Returns the wrapped modules' names."""
    read = read_adapter(adapter, _model_type(model))
    _check_adapter(model, read, repr(str(adapter)))
    settings = read.settings
    for module, (a, b) in read.factors.items():
        base = model.get_submodule(module)
        wrapped = LoraLinear(base, a.shape[0], read.scaling[module] * a.shape[0], settings.dropout)
        wrapped.lora_A.weight.copy_(a)
        wrapped.lora_B.weight.copy_(b)
        wrapped.lora_A.weight.requires_grad_(trainable)
        wrapped.lora_B.weight.requires_grad_(trainable)
        _set_module(model, module, wrapped)
    model.lora_settings = settings
    return list(read.factors)
