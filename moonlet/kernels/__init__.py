"""Fast paths for the CUDA engine, each with the plain-PyTorch reference it is tested against.

- ``moe``: routed experts as grouped GEMMs over expert-sorted tokens (the shared expert fused in).
- ``mla_decode``: absorbed MLA decode over the paged latent cache as a Triton kernel.
- ``quant_linear`` / ``quant_moe``: matmuls and routed experts computed from kept block-FP8 / INT4
  weights (W8A16 / W4A16 Triton kernel; references dequantize with ``moonlet.quant``).

Everything here imports without CUDA or Triton; the functions that need them say so when called.
"""
