"""Tensor and expert parallelism for inference: one model split over ``world_size`` processes.

The split (Megatron-style for attention and dense MLPs, expert parallel for the routed experts):

- Kimi Delta Attention (hybrid models): heads split the same way (their q/k/v projections, short
  convolutions, gates, decay parameters), ``o_proj`` reduced; each rank keeps its heads' recurrent state.
- MLA: each rank holds ``num_attention_heads / world_size`` heads: its rows of ``q_b_proj`` (or
  ``q_proj``) and ``kv_b_proj``, and the matching columns of ``o_proj``, whose partial outputs are
  summed by one all-reduce. The down-projections to the latent (``q_a_proj``,
  ``kv_a_proj_with_mqa``) and their norms are small and replicated, so every rank computes the same
  latent and keeps its own full copy of the latent KV cache (the cache has no head dimension to split).
- Dense MLP layers and the shared experts: the intermediate dimension is split (gate/up rows,
  down columns).
- Routed experts: rank r holds experts ``[r·E/W, (r+1)·E/W)``. The router is replicated, every rank
  routes every token the same way and computes only the slots that chose its experts; the routed
  and the shared partial sums are added and reduced with one all-reduce per MoE layer.
- Embedding and LM head: split over the vocabulary (contiguous ranges); the embedding's partial
  lookups are summed, the head's logits gathered.

So a decoder layer costs two all-reduces of [tokens, hidden], and the step one all-gather of the
sampled rows' logits. Weights are split while loading (``moonlet.weights.load_model(...,
tensor_parallel=...)``): a rank reads only its own experts from the checkpoint.

``TensorParallel`` wraps a process group (gloo on CPU, NCCL on CUDA). It calls the group's
collectives directly rather than through ``torch.distributed``'s default group, so an engine can
run in a process that uses torch.distributed for something else.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# How long a collective waits for a peer before it fails (a dead worker must not hang the server).
DEFAULT_TIMEOUT_S = 600


@dataclass
class Shard:
    """Where a local tensor comes from: ``source`` (a full-model tensor name), narrowed to
    ``[start, start + size)`` along ``dim`` (dim None: the whole tensor)."""

    source: str
    dim: int | None = None
    start: int = 0
    size: int = 0


class TensorParallel:
    """One rank's view of a tensor-parallel group: rank, world size and the collectives."""

    def __init__(self, rank: int, world_size: int, group=None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"tensor parallel rank {rank} / world size {world_size}: need 0 <= rank < world_size")
        if world_size > 1 and group is None:
            raise ValueError("a tensor-parallel group of more than one rank needs a process group")
        self.rank = rank
        self.world_size = world_size
        self.group = group

    @classmethod
    def connect(cls, rank: int, world_size: int, host: str, port: int, device: torch.device,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> "TensorParallel":
        """Join the group whose rank 0 listens on host:port (rank 0 starts the store). NCCL when
        ``device`` is CUDA, gloo otherwise."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        if torch.device(device).type == "cuda":
            group = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        tp = cls(rank, world_size, group)
        tp._store = store  # keep the store alive as long as the group
        return tp

    def split(self, n: int, what: str) -> tuple[int, int]:
        """(start, size) of this rank's equal share of ``n`` (``what`` names it in the error)."""
        if n % self.world_size:
            divisors = [d for d in range(1, n + 1) if n % d == 0 and d <= 64]
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size {self.world_size}; use a "
                             f"tensor_parallel_size that divides it: {', '.join(map(str, divisors))}")
        size = n // self.world_size
        return self.rank * size, size

    def vocab_range(self, vocab_size: int) -> tuple[int, int, int]:
        """(start, size, chunk) of this rank's vocabulary range: chunks of ceil(V / W), the last ones
        shorter (or empty) when W does not divide V."""
        chunk = -(-vocab_size // self.world_size)
        start = min(vocab_size, self.rank * chunk)
        return start, min(vocab_size, start + chunk) - start, chunk

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns it."""
        if self.world_size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` (equal shapes) along the last dimension."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.group.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)


# ---- sharded modules ------------------------------------------------------------------------------

class RowParallelLinear(nn.Linear):
    """A linear layer holding a slice of the input features: partial products summed over the ranks,
    then the (replicated) bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding the rows [vocab_start, vocab_start + num_embeddings): other tokens look up
    zeros here, and the sum over the ranks is every token's row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_start: int, tp: TensorParallel):
        super().__init__(num_embeddings, embedding_dim)
        self.vocab_start = vocab_start
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        if self.num_embeddings == 0:  # more ranks than vocabulary chunks: this rank holds no rows
            return self.tp.all_reduce(ids.new_zeros(*ids.shape, self.embedding_dim, dtype=self.weight.dtype))
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        out = out.masked_fill(~mine[..., None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Linear):
    """The output projection holding the vocabulary rows [vocab_start, + out_features); forward returns
    the full logits [..., vocab_size] on every rank."""

    def __init__(self, in_features: int, out_features: int, vocab_size: int, chunk: int, tp: TensorParallel):
        super().__init__(in_features, out_features, bias=False)
        self.vocab_size = vocab_size
        self.chunk = chunk
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if y.shape[-1] < self.chunk:  # the short last range: pad so every rank sends the same shape
            y = F.pad(y, (0, self.chunk - y.shape[-1]))
        return self.tp.all_gather(y)[..., :self.vocab_size]


# ---- splitting a model ----------------------------------------------------------------------------

def _linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    # a plain linear even where the full model had a quantized one: split weights are loaded dequantized
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def shard_transformer(model: nn.Module, tp: TensorParallel) -> dict[str, Shard]:
    """Turn a full ``Transformer`` (normally built on the meta device, before loading) into this rank's
    part, in place, and return where each of its tensors comes from: ``{local name: Shard}``. Tensors
    not listed are replicated under their own name. Raises ValueError when the model cannot be split
    ``tp.world_size`` ways (head, expert, intermediate counts not divisible)."""
    with torch.device(model.lm_head.weight.device):  # new modules where the model is (the meta device, loading)
        return _shard_transformer(model, tp)


def _shard_transformer(model: nn.Module, tp: TensorParallel) -> dict[str, Shard]:
    from .model.attention import MLAttention
    from .model.moe import MLP, MoE

    from .model.kda import KimiDeltaAttention, ShortConvolution

    config = model.config
    shards: dict[str, Shard] = {}
    dtype = model.lm_head.weight.dtype

    def note(local: str, source: str, dim: int, start: int, size: int) -> None:
        shards[local] = Shard(source, dim, start, size)

    def split_mlp(mlp: MLP, prefix: str, reduce: bool) -> None:
        inter = mlp.gate_proj.out_features
        start, size = tp.split(inter, f"{prefix} intermediate size")
        hidden = mlp.gate_proj.in_features
        mlp.gate_proj = _linear(hidden, size, False, dtype)
        mlp.up_proj = _linear(hidden, size, False, dtype)
        if reduce:
            down = RowParallelLinear(size, hidden, False, tp).to(dtype=dtype)
        else:  # the MoE reduces routed + shared once
            down = _linear(size, hidden, False, dtype)
        mlp.down_proj = down
        for name in ("gate_proj", "up_proj"):
            note(f"{prefix}.{name}.weight", f"{prefix}.{name}.weight", 0, start, size)
        note(f"{prefix}.down_proj.weight", f"{prefix}.down_proj.weight", 1, start, size)

    # vocabulary
    vstart, vsize, chunk = tp.vocab_range(config.vocab_size)
    emb = VocabParallelEmbedding(vsize, config.hidden_size, vstart, tp).to(dtype=dtype)
    model.model.embed_tokens = emb
    note("model.embed_tokens.weight", "model.embed_tokens.weight", 0, vstart, vsize)
    model.lm_head = ParallelLMHead(config.hidden_size, vsize, config.vocab_size, chunk, tp).to(dtype=dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = emb.weight
    else:
        note("lm_head.weight", "lm_head.weight", 0, vstart, vsize)

    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        if isinstance(attn, MLAttention):
            start, heads = tp.split(attn.num_heads, "num_attention_heads")
            qk, kvb = attn.qk_head_dim, attn.qk_nope_head_dim + attn.v_head_dim
            if attn.q_lora_rank:
                attn.q_b_proj = _linear(attn.q_lora_rank, heads * qk, False, dtype)
                note(f"{p}.self_attn.q_b_proj.weight", f"{p}.self_attn.q_b_proj.weight", 0, start * qk, heads * qk)
            else:
                attn.q_proj = _linear(attn.q_proj.in_features, heads * qk, False, dtype)
                note(f"{p}.self_attn.q_proj.weight", f"{p}.self_attn.q_proj.weight", 0, start * qk, heads * qk)
            attn.kv_b_proj = _linear(attn.kv_lora_rank, heads * kvb, False, dtype)
            note(f"{p}.self_attn.kv_b_proj.weight", f"{p}.self_attn.kv_b_proj.weight", 0, start * kvb, heads * kvb)
            v = attn.v_head_dim
            o = RowParallelLinear(heads * v, config.hidden_size, attn.o_proj.bias is not None, tp)
            attn.o_proj = o.to(dtype=dtype)
            note(f"{p}.self_attn.o_proj.weight", f"{p}.self_attn.o_proj.weight", 1, start * v, heads * v)
            attn.num_heads = heads
        elif isinstance(attn, KimiDeltaAttention):
            start, heads = tp.split(attn.num_heads, "linear_attn_config num_heads")
            d = attn.head_dim
            lo, n = start * d, heads * d  # channels of this rank's heads in every [H·d] dimension
            hidden = config.hidden_size
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, _linear(hidden, n, False, dtype))
                note(f"{p}.self_attn.{name}.weight", f"{p}.self_attn.{name}.weight", 0, lo, n)
                conv = f"{name[0]}_conv1d"
                setattr(attn, conv, ShortConvolution(n, attn.conv_size).to(dtype=dtype))
                note(f"{p}.self_attn.{conv}.weight", f"{p}.self_attn.{conv}.weight", 0, lo, n)
            for name in ("f_b_proj", "g_b_proj"):
                setattr(attn, name, _linear(d, n, False, dtype))
                note(f"{p}.self_attn.{name}.weight", f"{p}.self_attn.{name}.weight", 0, lo, n)
            attn.b_proj = _linear(hidden, heads, False, dtype)
            note(f"{p}.self_attn.b_proj.weight", f"{p}.self_attn.b_proj.weight", 0, start, heads)
            attn.A_log = nn.Parameter(torch.empty(1, 1, heads, 1, dtype=torch.float32))
            note(f"{p}.self_attn.A_log", f"{p}.self_attn.A_log", 2, start, heads)
            attn.dt_bias = nn.Parameter(torch.empty(n, dtype=torch.float32))
            note(f"{p}.self_attn.dt_bias", f"{p}.self_attn.dt_bias", 0, lo, n)
            attn.o_proj = RowParallelLinear(n, hidden, False, tp).to(dtype=dtype)
            note(f"{p}.self_attn.o_proj.weight", f"{p}.self_attn.o_proj.weight", 1, lo, n)
            attn.num_heads = heads
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            start, n_local = tp.split(len(mlp.experts), "n_routed_experts")
            mlp.experts = nn.ModuleList(mlp.experts[start:start + n_local])
            for j in range(n_local):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    local = f"{p}.mlp.experts.{j}.{name}.weight"
                    shards[local] = Shard(f"{p}.mlp.experts.{start + j}.{name}.weight")
            mlp.expert_offset = start
            if mlp.shared_experts is not None:
                split_mlp(mlp.shared_experts, f"{p}.mlp.shared_experts", reduce=False)
            mlp.tp = tp
        else:
            split_mlp(mlp, f"{p}.mlp", reduce=True)
    return shards
