"""Quantized checkpoint formats of the K2 family, to read (dequantize) and to write (quantize).

Block FP8 (Kimi-K2-Instruct, DeepSeek-V3): a linear weight is float8_e4m3fn ``weight`` plus a float32
``weight_scale_inv`` [ceil(out/128), ceil(in/128)]; W[i, j] = q[i, j] · s[i // 128, j // 128]. Edge
blocks of a dimension that is not a multiple of 128 are partial.

INT4 (K2-Thinking, K2.5, K2.6): compressed-tensors ``pack-quantized``, symmetric int4 in groups of 32
along the input dim, routed experts only. Per linear: ``weight_packed`` int32 [out, in/8],
``weight_scale`` [out, in/32] (bf16), ``weight_shape`` int32 [2]. Each int32 holds 8 consecutive
values of a row, value k of the 8 in bits 4k..4k+3 (least significant first), stored offset by +8
(int -8..7 -> nibble 0..15), as compressed-tensors' ``pack_to_int32`` writes them.
W = q · scale[i, j // 32].

Each scheme reads its parameters from a config.json ``quantization_config``; ``scheme_for`` picks
it for the loader, ``make_scheme`` builds one for writing.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .weights import Checkpoint

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT4_MIN, INT4_MAX = -8, 7
# Symmetric scale = max|w| / (range / 2) with range = 7 - (-8) = 15: the grid compressed-tensors uses.
_INT4_HALF_RANGE = (INT4_MAX - INT4_MIN) / 2


# ---- block FP8 ------------------------------------------------------------------------------------

def _block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def quantize_fp8_block(weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q float8_e4m3fn [out, in], scale_inv float32 [ceil(out/b0), ceil(in/b1)]).

    Each block's scale maps its largest magnitude to the FP8 maximum (448); an all-zero block gets 1.
    """
    if weight.dim() != 2:
        raise ValueError(f"block FP8 quantizes 2-D weights; got shape {tuple(weight.shape)}")
    (out_f, in_f), (b0, b1) = weight.shape, block_size
    rows, cols = _block_grid((out_f, in_f), block_size)
    w = weight.float()
    padded = torch.zeros(rows * b0, cols * b1, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w
    amax = padded.view(rows, b0, cols, b1).abs().amax(dim=(1, 3))  # [rows, cols]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = padded.view(rows, b0, cols, b1) / scale[:, None, :, None]
    q = scaled.clamp(-FP8_MAX, FP8_MAX).view(rows * b0, cols * b1)[:out_f, :in_f].to(FP8_DTYPE)
    return q.contiguous(), scale


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q [out, in] (float8) and scale_inv [ceil(out/b0), ceil(in/b1)] -> W [out, in] in ``dtype``."""
    (out_f, in_f), (b0, b1) = q.shape, block_size
    grid = _block_grid((out_f, in_f), block_size)
    if tuple(scale_inv.shape) != grid:
        raise ValueError(f"FP8 scale_inv has shape {list(scale_inv.shape)}; a [{out_f}, {in_f}] weight with "
                         f"{b0}x{b1} blocks needs {list(grid)}")
    w = q.to(torch.float32)
    s = scale_inv.to(device=w.device, dtype=torch.float32)
    if out_f % b0 == 0 and in_f % b1 == 0:
        w = w.view(grid[0], b0, grid[1], b1).mul_(s[:, None, :, None]).view(out_f, in_f)
    else:  # partial edge blocks: spell the scale out per element
        w.mul_(s.repeat_interleave(b0, dim=0)[:out_f].repeat_interleave(b1, dim=1)[:, :in_f])
    return w.to(dtype)


# ---- INT4 pack-quantized --------------------------------------------------------------------------

def quantize_int4(weight: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group quantization: weight [out, in] -> (q int8 in [-8, 7] [out, in],
    scale [out, in/group] in ``scale_dtype``). q = clamp(round(w / scale), -8, 7), computed with
    the scale as stored, so dequantization reproduces the grid exactly."""
    if weight.dim() != 2:
        raise ValueError(f"INT4 packing quantizes 2-D weights; got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"INT4 groups of {group_size} need in_features divisible by {group_size}; got {in_f}")
    w = weight.float().view(out_f, in_f // group_size, group_size)
    scale = (w.abs().amax(dim=-1) / _INT4_HALF_RANGE).to(scale_dtype)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group quantizes to zeros
    q = torch.round(w / safe[..., None]).clamp(INT4_MIN, INT4_MAX).to(torch.int8)
    return q.view(out_f, in_f), scale


def pack_int4_values(q: torch.Tensor) -> torch.Tensor:
    """q int8 [out, in] in [-8, 7] -> int32 [out, ceil(in/8)]: value k of each 8 in bits 4k..4k+3, +8 offset."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4_values takes int8 values; got {q.dtype}")
    out_f, in_f = q.shape
    words = math.ceil(in_f / 8)
    nibbles = torch.zeros(out_f, words * 8, dtype=torch.int64, device=q.device)
    nibbles[:, :in_f] = q.to(torch.int64) - INT4_MIN
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    packed = (nibbles.view(out_f, words, 8) << shifts).sum(dim=-1)  # < 2**32, exact in int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as signed int32
    return packed.to(torch.int32)


def unpack_int4_values(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [out, ceil(in/8)] -> int8 [out, in_features] in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"weight_packed must be int32; got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # arithmetic shift, but the mask keeps 4 bits
    return (nibbles.flatten(-2)[..., :in_features] + INT4_MIN).to(torch.int8)


def pack_int4(weight: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16
              ) -> dict[str, torch.Tensor]:
    """weight [out, in] -> {"weight_packed", "weight_scale", "weight_shape"} as compressed-tensors stores them."""
    q, scale = quantize_int4(weight, group_size, scale_dtype)
    return {"weight_packed": pack_int4_values(q), "weight_scale": scale,
            "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int32)}


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, shape, group_size: int = 32,
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of ``pack_int4``: W [out, in] = q · scale[:, j // group] in ``dtype``."""
    out_f, in_f = (int(x) for x in shape)
    q = unpack_int4_values(packed, in_f).float()
    groups = math.ceil(in_f / group_size)
    if tuple(scale.shape) != (out_f, groups):
        raise ValueError(f"weight_scale has shape {list(scale.shape)}; [{out_f}, {in_f}] in groups of "
                         f"{group_size} needs [{out_f}, {groups}]")
    s = scale.to(device=q.device, dtype=torch.float32).repeat_interleave(group_size, dim=1)[:, :in_f]
    return (q * s).to(dtype)


# ---- schemes: which tensors, how they are stored --------------------------------------------------

def _dtype_of(linear: nn.Linear) -> torch.dtype:
    return linear.weight.dtype


def _module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _matches(patterns, names) -> bool:
    """compressed-tensors' rule: "re:X" is re.match(X, name), anything else is an exact name."""
    for p in patterns or ():
        for n in names:
            if (re.match(p[3:], n) if p.startswith("re:") else p == n):
                return True
    return False


class Fp8BlockScheme:
    """DeepSeek-style block FP8: every linear weight except lm_head (and ``modules_to_not_convert``)."""

    kind = "fp8"

    def __init__(self, block_size=(128, 128), modules_to_not_convert=None):
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, qc: dict) -> "Fp8BlockScheme":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"unsupported FP8 format {fmt!r} in quantization_config; moonlet reads e4m3")
        block = qc.get("weight_block_size") or [128, 128]
        if len(block) != 2:
            raise ValueError(f"quantization_config weight_block_size must be [rows, cols]; got {block}")
        return cls(block, qc.get("modules_to_not_convert"))

    def config_dict(self) -> dict:
        out = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
               "weight_block_size": list(self.block_size)}
        if self.modules_to_not_convert:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return out

    def should_quantize(self, name: str, linear_modules: set[str]) -> bool:
        module = _module_of(name)
        if not name.endswith(".weight") or module not in linear_modules or module == "lm_head":
            return False
        return not any(skip == module or module.startswith(skip + ".") or module.endswith("." + skip)
                       for skip in self.modules_to_not_convert)

    def quantize(self, name: str, tensor: torch.Tensor, scale_dtype=None) -> dict[str, torch.Tensor]:
        """The checkpoint tensors for weight ``name`` (scales are always float32 in this format)."""
        q, scale = quantize_fp8_block(tensor, self.block_size)
        return {name: q, name + "_scale_inv": scale}

    def match(self, name: str, tensors: dict[str, str]):
        from .weights import _Entry

        scale = name + "_scale_inv"
        if name in tensors and scale in tensors:
            return _Entry(name, self.kind, {"weight": tensors[name], "scale_inv": tensors[scale]})
        return None

    def check_shapes(self, entry, shape, ckpt: "Checkpoint") -> None:
        w, s = entry.parts["weight"], entry.parts["scale_inv"]
        if ckpt.shape(w) != shape:
            raise ValueError(f"tensor {w!r} in {ckpt.file_of(w)} has shape {list(ckpt.shape(w))}; "
                             f"the model expects {list(shape)} (from config.json)")
        grid = _block_grid(shape, self.block_size)
        if ckpt.shape(s) != grid:
            raise ValueError(f"tensor {s!r} in {ckpt.file_of(s)} has shape {list(ckpt.shape(s))}; a {list(shape)} "
                             f"weight with {list(self.block_size)} blocks needs {list(grid)}")
        if ckpt.dtype_name(w) != "F8_E4M3":
            raise ValueError(f"tensor {w!r} in {ckpt.file_of(w)} has a scale_inv companion but dtype "
                             f"{ckpt.dtype_name(w)}; block FP8 weights are float8_e4m3fn (F8_E4M3)")

    def dequantize(self, entry, ckpt: "Checkpoint", device, dtype) -> torch.Tensor:
        q = ckpt.get(entry.parts["weight"]).to(device)
        s = ckpt.get(entry.parts["scale_inv"]).to(device)
        return dequantize_fp8_block(q, s, self.block_size, dtype)

    def kept_module(self, linear: nn.Linear, entry, ckpt: "Checkpoint") -> nn.Module:
        """The ``Fp8BlockLinear`` (on the meta device) that holds ``linear``'s stored tensors as they are."""
        from .model.quantized import Fp8BlockLinear

        return Fp8BlockLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              block_size=self.block_size, dtype=_dtype_of(linear), device="meta")

    def kept_parts(self, entry) -> dict[str, str]:
        """Buffer name of the kept module -> checkpoint tensor name."""
        return {"weight": entry.parts["weight"], "weight_scale_inv": entry.parts["scale_inv"]}


class Int4GroupScheme:
    """compressed-tensors pack-quantized, symmetric int4 groups: the K2-Thinking / K2.5 / K2.6 layout."""

    kind = "int4"
    # K2-Thinking's choice: only the routed experts are quantized.
    DEFAULT_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                      "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]

    def __init__(self, group_size: int = 32, ignore=None, targets=("Linear",)):
        self.group_size = int(group_size)
        self.ignore = list(self.DEFAULT_IGNORE if ignore is None else ignore)
        self.targets = list(targets)

    @classmethod
    def from_config(cls, qc: dict) -> "Int4GroupScheme":
        fmt = qc.get("format")
        if fmt != "pack-quantized":
            raise ValueError(f"unsupported compressed-tensors format {fmt!r}; moonlet reads 'pack-quantized' (int4)")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise ValueError(f"moonlet reads one compressed-tensors config group; got {len(groups)}")
        group = next(iter(groups.values()))
        w = group.get("weights") or {}
        want = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
        bad = {k: w.get(k) for k, v in want.items() if w.get(k) != v}
        if bad:
            raise ValueError(f"unsupported compressed-tensors weights {bad}; moonlet reads symmetric int4 groups "
                             f"({want})")
        return cls(w.get("group_size") or 32, qc.get("ignore") or [], group.get("targets") or ["Linear"])

    def config_dict(self) -> dict:
        return {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": list(self.targets), "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                "group_size": self.group_size, "dynamic": False}}},
            "ignore": list(self.ignore),
        }

    def _targeted(self, module: str, linear_modules: set[str]) -> bool:
        names = (module, "language_model." + module)  # K2.5 spells names with its text-model prefix
        targeted = (module in linear_modules and "Linear" in self.targets) or _matches(
            [t for t in self.targets if t != "Linear"], names)
        return targeted and not _matches(self.ignore, names)

    def should_quantize(self, name: str, linear_modules: set[str]) -> bool:
        return name.endswith(".weight") and self._targeted(_module_of(name), linear_modules)

    def quantize(self, name: str, tensor: torch.Tensor, scale_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
        """The checkpoint tensors for weight ``name``; scales in ``scale_dtype`` (the model's dtype)."""
        module = _module_of(name)
        return {f"{module}.{k}": v for k, v in pack_int4(tensor, self.group_size, scale_dtype).items()}

    def match(self, name: str, tensors: dict[str, str]):
        from .weights import _Entry

        module = _module_of(name)
        parts = {k: f"{module}.weight_{k}" for k in ("packed", "scale", "shape")}
        if parts["packed"] not in tensors:
            return None
        missing = [v for v in parts.values() if v not in tensors]
        if missing:
            raise ValueError(f"{tensors[parts['packed']]} is INT4-packed but {', '.join(missing)} is missing "
                             f"from the checkpoint")
        if f"{module}.weight_zero_point" in tensors:
            raise ValueError(f"{module} has a weight_zero_point: asymmetric INT4 is not supported")
        return _Entry(name, self.kind, {k: tensors[v] for k, v in parts.items()})

    def check_shapes(self, entry, shape, ckpt: "Checkpoint") -> None:
        p, s, sh = entry.parts["packed"], entry.parts["scale"], entry.parts["shape"]
        stored = tuple(int(x) for x in ckpt.get(sh).tolist())
        if stored != tuple(shape):
            raise ValueError(f"tensor {sh!r} in {ckpt.file_of(sh)} says {list(stored)}; the model expects "
                             f"{list(shape)} (from config.json)")
        out_f, in_f = shape
        for raw, want in ((p, (out_f, math.ceil(in_f / 8))), (s, (out_f, math.ceil(in_f / self.group_size)))):
            if ckpt.shape(raw) != want:
                raise ValueError(f"tensor {raw!r} in {ckpt.file_of(raw)} has shape {list(ckpt.shape(raw))}; "
                                 f"a {list(shape)} weight needs {list(want)}")

    def kept_module(self, linear: nn.Linear, entry, ckpt: "Checkpoint") -> nn.Module:
        """The ``Int4GroupLinear`` (on the meta device) that holds ``linear``'s stored tensors as they are
        (its scales in the checkpoint's scale dtype)."""
        from .model.quantized import Int4GroupLinear
        from .weights import SAFETENSORS_DTYPES

        code = ckpt.dtype_name(entry.parts["scale"])
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {entry.parts['scale']!r} in {ckpt.file_of(entry.parts['scale'])} has dtype "
                             f"{code}; INT4 scales are read as BF16, F16 or F32")
        return Int4GroupLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               group_size=self.group_size, scale_dtype=SAFETENSORS_DTYPES[code],
                               dtype=_dtype_of(linear), device="meta")

    def kept_parts(self, entry) -> dict[str, str]:
        """Buffer name of the kept module -> checkpoint tensor name."""
        return {"weight_packed": entry.parts["packed"], "weight_scale": entry.parts["scale"],
                "weight_shape": entry.parts["shape"]}

    def dequantize(self, entry, ckpt: "Checkpoint", device, dtype) -> torch.Tensor:
        packed = ckpt.get(entry.parts["packed"]).to(device)
        scale = ckpt.get(entry.parts["scale"]).to(device)
        shape = ckpt.get(entry.parts["shape"]).tolist()
        return unpack_int4(packed, scale, shape, self.group_size, dtype)

    def check_placement(self, entries, linear_modules: set[str]) -> None:
        """Warn when the packed tensors disagree with the config's targets and ignore list."""
        packed = {_module_of(e.name) for e in entries if e.kind == self.kind}
        plain = {_module_of(e.name) for e in entries if e.kind == "plain"}
        odd = sorted(m for m in packed if not self._targeted(m, linear_modules))
        odd += sorted(m for m in plain if m in linear_modules and self._targeted(m, linear_modules))
        if odd:
            warnings.warn(f"quantization_config's ignore list disagrees with the checkpoint for {len(odd)} module(s), "
                          f"e.g. {odd[0]}; loading what the checkpoint holds", stacklevel=3)


def make_scheme(spec) -> Fp8BlockScheme | Int4GroupScheme:
    """A scheme for writing: "fp8", "int4" (routed experts, K2-Thinking's layout), a scheme, or a
    config.json ``quantization_config`` dict."""
    if isinstance(spec, (Fp8BlockScheme, Int4GroupScheme)):
        return spec
    if spec == "fp8":
        return Fp8BlockScheme()
    if spec == "int4":
        return Int4GroupScheme()
    if isinstance(spec, dict):
        method = spec.get("quant_method")
        if method == "fp8":
            return Fp8BlockScheme.from_config(spec)
        if method == "compressed-tensors":
            return Int4GroupScheme.from_config(spec)
        raise ValueError(f"unsupported quant_method {method!r}; moonlet reads 'fp8' and 'compressed-tensors'")
    raise ValueError(f"unknown quantization {spec!r}; use 'fp8', 'int4' or a quantization_config dict")


_QUANT_SUFFIXES = ("_scale_inv", ".weight_packed")


def scheme_for(config, ckpt: "Checkpoint", model: nn.Module):
    """The scheme that reads ``ckpt``: from config.json's quantization_config (K2.5 keeps it next to
    text_config), or None for plain checkpoints. Raises when quantized tensors come without one."""
    qc = config.quantization_config or (config.outer or {}).get("quantization_config")
    if not qc:
        odd = next((n for n in ckpt.files if n.endswith(_QUANT_SUFFIXES)), None)
        if odd is not None:
            raise ValueError(f"checkpoint {ckpt.directory} holds quantized tensors (e.g. {odd}) but its config.json "
                             f"has no quantization_config saying how to read them")
        return None
    return make_scheme(qc)
