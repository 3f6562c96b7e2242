"""Linear layers that keep a checkpoint's quantized weights as stored and compute with them.

``Fp8BlockLinear`` (Kimi-K2-Instruct, DeepSeek-V3: float8_e4m3fn ``weight`` [out, in] + float32
``weight_scale_inv`` [ceil(out/b0), ceil(in/b1)]) and ``Int4GroupLinear`` (K2-Thinking, K2.5, K2.6:
compressed-tensors int32 ``weight_packed`` [out, in/8] + ``weight_scale`` [out, in/group] (bf16 in
the published checkpoints) + int32 ``weight_shape`` [2]). The formats are the ones ``moonlet.quant``
documents; the tensor names are the checkpoint's, so ``state_dict()`` gives the hub names and the
file's bytes. They are buffers, not parameters: quantized weights are not trained, and
``Transformer.cast`` leaves them (and their scales) as stored.

forward(x) runs on CUDA, where it can, the Triton W8A16 / W4A16 kernel
(``moonlet.kernels.quant_linear``: the weight tile dequantized in registers, fp32 accumulation);
elsewhere, the plain-PyTorch reference: dequantize to x.dtype with ``moonlet.quant``, then
``F.linear``. ``QuantizedLinear.kernel`` ("auto", "triton", "reference") overrides the choice
(per module, or for all of them on the class).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import quant_linear
from ..kernels.quant_linear import QuantizedMatrix
from ..quant import FP8_DTYPE

KERNELS = ("auto", "triton", "reference")


class QuantizedLinear(nn.Module):
    """Base of the quantized linears: y = x · Wᵀ (+ bias) with W read from its stored form."""

    kind = ""
    kernel = "auto"  # "auto": Triton on CUDA where it can run, else the reference

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._dense_cache: tuple | None = None

    # names of the buffers holding the stored values and the scales
    data_name = ""
    scale_name = ""

    def matrix(self) -> QuantizedMatrix:
        """The stored weight as a ``QuantizedMatrix`` (views of this module's buffers)."""
        raise NotImplementedError

    def point_at(self, data: torch.Tensor, scale: torch.Tensor) -> None:
        """Make the stored values and scales these tensors (views of a stack: ``MoE.fuse_experts``)."""
        old = self.matrix()
        if data.shape != old.data.shape or data.dtype != old.data.dtype or scale.shape != old.scale.shape:
            raise ValueError(f"{type(self).__name__}: new storage {list(data.shape)} {data.dtype} / "
                             f"{list(scale.shape)} does not match {list(old.data.shape)} {old.data.dtype} / "
                             f"{list(old.scale.shape)}")
        self._buffers[self.data_name] = data
        self._buffers[self.scale_name] = scale

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dense weight [out, in] in ``dtype`` (moonlet.quant's dequantization)."""
        return self.matrix().dequantize(dtype)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight in ``dtype``, kept until the stored tensors change (for code that needs the
        matrix itself, as MLA's absorbed attention does with kv_b_proj). Costs a dense copy of this one
        weight."""
        m = self.matrix()
        key = (m.data.data_ptr(), m.scale.data_ptr(), m.data.device, dtype)
        if self._dense_cache is None or self._dense_cache[0] != key:
            self._dense_cache = (key, self.dequantize(dtype))
        return self._dense_cache[1]

    def use_triton(self, x: torch.Tensor) -> bool:
        if self.kernel not in KERNELS:
            raise ValueError(f"{type(self).__name__}.kernel={self.kernel!r}; use one of {', '.join(KERNELS)}")
        if self.kernel == "reference" or (self.kernel == "auto" and not x.is_cuda):
            return False
        ok = quant_linear.available(self.kind)
        if self.kernel == "triton" and not ok:
            raise ValueError(f"{type(self).__name__}.kernel='triton' needs a CUDA input and a GPU the {self.kind} "
                             f"kernel runs on (triton installed); got a {x.device} input; use 'auto' or 'reference'")
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.use_triton(x):
            return quant_linear.quant_linear_triton(x, self.matrix(), bias)
        return quant_linear.quant_linear_reference(x, self.matrix(), bias)

    def logical_numel(self) -> int:
        """Weights this layer stands for (out x in), as a dense checkpoint would count them."""
        return self.in_features * self.out_features

    def stored_nbytes(self) -> int:
        """Bytes of the stored tensors (weights, scales, shape)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Fp8BlockLinear(QuantizedLinear):
    """Block-FP8 linear: ``weight`` float8_e4m3fn [out, in], ``weight_scale_inv`` float32
    [ceil(out/b0), ceil(in/b1)]; W[i, j] = weight[i, j] · weight_scale_inv[i // b0, j // b1]."""

    kind = "fp8"
    data_name, scale_name = "weight", "weight_scale_inv"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size=(128, 128),
                 dtype: torch.dtype | None = None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.block_size = (int(block_size[0]), int(block_size[1]))
        grid = (math.ceil(out_features / self.block_size[0]), math.ceil(in_features / self.block_size[1]))
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(grid, dtype=torch.float32, device=device))

    def matrix(self) -> QuantizedMatrix:
        return QuantizedMatrix("fp8", self.weight, self.weight_scale_inv, (self.out_features, self.in_features),
                               self.block_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={list(self.block_size)}"


class Int4GroupLinear(QuantizedLinear):
    """compressed-tensors pack-quantized INT4 linear: ``weight_packed`` int32 [out, ceil(in/8)],
    ``weight_scale`` [out, ceil(in/group)] (``scale_dtype``, bf16 in published checkpoints),
    ``weight_shape`` int32 [2] = [out, in]; W[i, j] = q[i, j] · weight_scale[i, j // group]."""

    kind = "int4"
    data_name, scale_name = "weight_packed", "weight_scale"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 scale_dtype: torch.dtype = torch.bfloat16, dtype: torch.dtype | None = None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = int(group_size)
        self.register_buffer("weight_packed", torch.empty(out_features, math.ceil(in_features / 8),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, math.ceil(in_features / self.group_size),
                                                         dtype=scale_dtype, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int32,
                                                          device=device))

    def matrix(self) -> QuantizedMatrix:
        return QuantizedMatrix("int4", self.weight_packed, self.weight_scale, (self.out_features, self.in_features),
                               (1, self.group_size))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def dense_weight(linear: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A linear layer's weight matrix [out, in]: ``nn.Linear.weight`` as is, or a quantized layer's
    dequantized weight in ``dtype`` (cached on the layer)."""
    if isinstance(linear, QuantizedLinear):
        return linear.dense_weight(dtype or torch.bfloat16)
    return linear.weight


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """(name, module) of every quantized linear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held in memory (a tied tensor once; the rotary
    frequencies and other derived buffers included, they are small)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
