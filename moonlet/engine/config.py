"""EngineConfig: the engine's knobs, and how the cache pool and context length follow from them."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .cache import available_memory, bytes_per_block, latent_layer_ids, parse_bytes
from .kv_quant import KV_CACHE_DTYPES, entry_bytes, resolve_kv_cache_dtype
from .spec import SPECULATIVE_METHODS, SpeculativeConfig

# CPU default: a small share of free RAM, never more than this.
CPU_KV_FRACTION = 0.05
CPU_KV_MAX_BYTES = 1 << 30
CUDA_KV_FRACTION = 0.8
# vision models: projected image features kept by image digest (on the model's device)
IMAGE_FEATURE_CACHE_BYTES = 256 * 2**20
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass
class EngineConfig:
    """Engine settings. ``None`` means "pick a default for the device".

    Cache pool size, in order of precedence: ``num_blocks``; ``kv_cache_memory`` (bytes or a string
    such as "512MiB"); ``kv_cache_fraction`` of the memory available after the model is loaded
    (default 0.8 of free GPU memory; on CPU 0.05 of MemAvailable, at most 1 GiB). The pool is never
    made larger than ``max_num_seqs`` full-length sequences need. ``max_model_len`` defaults to the
    model's max_position_embeddings and is capped by what the pool can hold.
    """

    block_size: int | None = None  # 16 on CPU, 64 on CUDA (FlashMLA's block size)
    num_blocks: int | None = None
    kv_cache_memory: int | str | None = None
    kv_cache_fraction: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None  # 512 on CPU, 8192 on CUDA
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_waiting: int = 1024  # more waiting requests than this: EngineOverloadedError
    # which waiting request is admitted next and which running one is preempted first: "fcfs" (arrival
    # order) or "priority" (SamplingParams.priority, lower first, then arrival; vLLM's convention)
    scheduling_policy: str = "fcfs"
    device: str | None = None
    dtype: str | None = None
    seed: int | None = None
    model_name: str | None = None
    # prefill attention: "expanded" (per-head keys/values, fused attention; default on CUDA) or
    # "absorbed" (over the latents, as decode; default on CPU). Decode is always absorbed.
    prefill_attention: str | None = None
    # decode steps from CUDA graphs: "cuda" (captured, the default on CUDA), "eager" (the same static
    # buffers and padding without capture: for testing on CPU) or "off" (the default on CPU)
    decode_graphs: str | None = None
    # decode attention kernel: "triton" (moonlet.kernels.mla_decode; the default on CUDA when Triton
    # is installed) or "reference" (plain PyTorch, moonlet.engine.attention)
    decode_kernel: str | None = None
    decode_graph_batch_sizes: tuple[int, ...] | None = None  # default DEFAULT_BATCH_SIZES up to max_num_seqs
    # hybrid models (KDA layers): snapshot rows of the recurrent state at block boundaries, what lets
    # a prefix-cache hit resume (default max_num_seqs; 0: no prefix hits for such models)
    state_snapshots: int | None = None
    # speculative decoding: None (off) or "ngram" (prompt-lookup drafts, moonlet.engine.spec): up to
    # num_speculative_tokens drafts per decoding sequence and step, from the latest earlier occurrence
    # of its last ngram_max .. ngram_min tokens; verified in the same forward, output unchanged
    # "draft": the greedy continuation of a smaller model of the same tokenizer (moonlet.engine.draft),
    # speculative_model: its checkpoint directory (or a loaded model); its latent cache shares the KV
    # cache budget
    speculative: str | None = None
    speculative_model: str | os.PathLike | torch.nn.Module | None = None
    num_speculative_tokens: int = 4
    ngram_max: int = 4
    ngram_min: int = 2
    # vision models: bytes of projected image features kept by image content (LRU), so an image sent
    # again in another prompt is not encoded again; default IMAGE_FEATURE_CACHE_BYTES, 0 turns it off
    image_feature_cache_memory: int | str | None = None
    # tensor parallelism (moonlet.parallel, moonlet.engine.parallel): the model split over this many
    # processes (GPUs cuda:i .. cuda:i+N-1 on CUDA, gloo on the CPU); attention heads, MLP columns and
    # the vocabulary split N ways, routed experts spread over the ranks (expert parallel)
    tensor_parallel_size: int = 1
    # quantized checkpoints (block FP8, INT4 experts): "keep" computes from the stored weights
    # (moonlet.model.quantized; Triton kernels on CUDA), "dequantize" turns them into dtype weights
    # while loading. Default: keep on CUDA, dequantize elsewhere. Plain checkpoints load the same either way.
    quantization: str | None = None
    # host tier of the prefix cache: bytes (or e.g. "8GiB") of host memory that keeps cached blocks
    # evicted from the device pool, copied back on a later prefix hit instead of recomputed
    # (moonlet.engine.host_cache); 0 or None: off. Pinned memory on CUDA. Not for hybrid (KDA) models.
    host_cache_memory: int | str | None = None
    # disk tier of the prefix cache (moonlet.engine.disk_cache): a directory where every cached block is
    # also written (in the background), read back on a later prefix hit, also after a restart; one
    # subdirectory per model and cache layout. disk_cache_size: its cap in bytes or e.g. "20GiB" (least
    # recently used files deleted first; default 10 GiB, at most half the free space). Not for hybrid (KDA)
    # models, speculative='mtp' or tensor_parallel_size > 1.
    disk_cache_dir: str | os.PathLike | None = None
    disk_cache_size: int | str | None = None
    # storage of the latent KV cache: "auto" (None: the model dtype) or "fp8" (float8_e4m3fn with a
    # float32 scale per token entry for the latent and one for k_pe; about half the bytes per token, so
    # about twice the tokens in the same memory; moonlet.engine.kv_quant)
    kv_cache_dtype: str | None = None
    # a PEFT LoRA adapter directory merged into the weights at load time (moonlet.model.lora); with it
    # quantized checkpoints default to "dequantize" (the merge needs dense weights); not with tensor_parallel_size > 1
    lora: str | os.PathLike | None = None
    # multi-LoRA serving (moonlet.engine.lora): adapters served unmerged over the base model, several at
    # once and batched together, selected per request (SamplingParams.lora). ``lora_modules``: {name: PEFT
    # adapter directory} registered at start (implies enable_lora); more with add_lora at run time.
    # ``max_loras`` adapters are resident on the device at once (stacked factors per adapted linear, ranks
    # zero-padded to ``max_lora_rank``); other adapters wait in host memory and replace the least recently
    # used resident one that no running request holds
    enable_lora: bool = False
    lora_modules: dict[str, str | os.PathLike] | None = None
    max_loras: int = 4
    max_lora_rank: int = 16
    # a waiting request whose adapter cannot get a resident slot is passed by later requests; after this
    # many scheduling steps of waiting, later requests that use an adapter stop passing it (those of the
    # base model still do) until it gets a slot, so it cannot wait forever
    max_lora_wait_steps: int = 32

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def validate(self) -> None:
        for name in ("block_size", "num_blocks", "max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"engine argument {name}={value!r} must be a positive integer")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"engine argument tensor_parallel_size={self.tensor_parallel_size!r} must be a positive "
                             "integer (1: no tensor parallelism)")
        if self.max_num_seqs < 1:
            raise ValueError(f"engine argument max_num_seqs={self.max_num_seqs!r} must be >= 1")
        if self.state_snapshots is not None and (not isinstance(self.state_snapshots, int) or self.state_snapshots < 0):
            raise ValueError(f"engine argument state_snapshots={self.state_snapshots!r} must be an integer >= 0")
        if self.max_waiting < 0:
            raise ValueError(f"engine argument max_waiting={self.max_waiting!r} must be >= 0")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"engine argument scheduling_policy={self.scheduling_policy!r} must be one of "
                             f"{', '.join(map(repr, SCHEDULING_POLICIES))}")
        if self.prefill_attention not in (None, "expanded", "absorbed"):
            raise ValueError(f"engine argument prefill_attention={self.prefill_attention!r} must be 'expanded' or "
                             f"'absorbed'")
        if self.decode_kernel not in (None, "triton", "reference"):
            raise ValueError(f"engine argument decode_kernel={self.decode_kernel!r} must be 'triton' or 'reference'")
        if self.quantization not in (None, "keep", "dequantize"):
            raise ValueError(f"engine argument quantization={self.quantization!r} must be 'keep' or 'dequantize'")
        if self.decode_graphs not in (None, "cuda", "eager", "off"):
            raise ValueError(f"engine argument decode_graphs={self.decode_graphs!r} must be 'cuda', 'eager' or 'off'")
        if self.decode_graph_batch_sizes is not None and (
                not self.decode_graph_batch_sizes or any(not isinstance(b, int) or b < 1
                                                         for b in self.decode_graph_batch_sizes)):
            raise ValueError(f"engine argument decode_graph_batch_sizes={self.decode_graph_batch_sizes!r} must be "
                             f"positive integers")
        if self.kv_cache_fraction is not None and not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"engine argument kv_cache_fraction={self.kv_cache_fraction!r} must be in (0, 1]")
        self._validate_lora()
        self.speculative_config()  # raises on bad speculative settings
        self.image_cache_bytes()  # raises on a bad image feature cache size
        self.host_cache_bytes()  # raises on a bad host cache size
        self.disk_cache_bytes()  # raises on a bad disk cache size
        resolve_kv_cache_dtype(self.kv_cache_dtype, torch.float32)  # raises on a bad or unsupported cache dtype
        if self.lora is not None and self.tensor_parallel_size > 1:
            raise ValueError(f"engine argument lora={str(self.lora)!r} with tensor_parallel_size="
                             f"{self.tensor_parallel_size}: each rank loads only its slices, so the adapter cannot be "
                             "merged before sharding; merge it into a full checkpoint first "
                             "(moonlet.train.trainer.merge_lora_checkpoint) and serve that")
        if self.lora is not None and self.quantization == "keep":
            raise ValueError(f"engine argument lora={str(self.lora)!r} with quantization='keep': merging an adapter "
                             "needs dense weights; use quantization='dequantize' (the default with lora)")

    @property
    def lora_enabled(self) -> bool:
        """Whether the engine serves LoRA adapters unmerged (``enable_lora`` or ``lora_modules``)."""
        return bool(self.enable_lora or self.lora_modules)

    def _validate_lora(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_lora_wait_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"engine argument {name}={value!r} must be a positive integer")
        if self.lora_modules is not None:
            if not isinstance(self.lora_modules, dict) or any(not isinstance(k, str) or not k
                                                              for k in self.lora_modules):
                raise ValueError(f"engine argument lora_modules={self.lora_modules!r} must be a dict "
                                 "{adapter name: PEFT adapter directory} (CLI --lora-modules name=path ...)")
        if self.lora_enabled and self.tensor_parallel_size > 1:
            raise ValueError(f"multi-LoRA serving (enable_lora / lora_modules) with tensor_parallel_size="
                             f"{self.tensor_parallel_size} is not supported: the adapters' factors are not sharded "
                             "over the ranks; serve with tensor_parallel_size=1, or merge one adapter into the "
                             "checkpoint (moonlet lora merge) and serve that")

    def image_cache_bytes(self) -> int:
        """The image feature cache's size in bytes (vision models), checked."""
        if self.image_feature_cache_memory is None:
            return IMAGE_FEATURE_CACHE_BYTES
        size = parse_bytes(self.image_feature_cache_memory)
        if size < 0:
            raise ValueError(f"engine argument image_feature_cache_memory={self.image_feature_cache_memory!r} must "
                             f"be >= 0 bytes (0 turns the image feature cache off)")
        return size

    def host_cache_bytes(self) -> int:
        """The host cache tier's size in bytes (0: off), checked."""
        if self.host_cache_memory is None:
            return 0
        if isinstance(self.host_cache_memory, bool):
            raise ValueError(f"engine argument host_cache_memory={self.host_cache_memory!r} must be a number of "
                             f"bytes or a size such as '8GiB'")
        size = parse_bytes(self.host_cache_memory)
        if size < 0:
            raise ValueError(f"engine argument host_cache_memory={self.host_cache_memory!r} must be >= 0 bytes "
                             f"(0 turns the host cache tier off)")
        return size

    def disk_cache_bytes(self) -> int | None:
        """The disk tier's cap in bytes (None: the default, decided when the directory is opened), checked."""
        if self.disk_cache_size is None:
            return None
        given = f"engine argument disk_cache_size={self.disk_cache_size!r}"
        if self.disk_cache_dir is None:
            raise ValueError(f"{given} needs disk_cache_dir (CLI --disk-cache-dir), the directory of the disk tier")
        if isinstance(self.disk_cache_size, bool):
            raise ValueError(f"{given} must be a number of bytes or a size such as '20GiB'")
        size = parse_bytes(self.disk_cache_size)
        if size <= 0:
            raise ValueError(f"{given} must be > 0 bytes (leave disk_cache_dir unset to turn the disk tier off)")
        return size

    def speculative_config(self) -> SpeculativeConfig | None:
        """The validated speculative-decoding settings, or None when it is off."""
        if self.speculative is None:
            if self.speculative_model is not None:
                raise ValueError(f"engine argument speculative_model={self.speculative_model!r} needs "
                                 "speculative='draft' (CLI --speculative draft)")
            return None
        draft = self.speculative_model
        if isinstance(draft, torch.nn.Module):
            draft = f"<{type(draft).__name__} object>"
        elif draft is not None and not isinstance(draft, (str, os.PathLike)):
            raise ValueError(f"engine argument speculative_model={draft!r} must be a checkpoint directory path (or, "
                             "from Python, a loaded moonlet model)")
        return SpeculativeConfig(self.speculative, self.num_speculative_tokens, self.ngram_max, self.ngram_min,
                                 str(draft) if draft is not None else None)


@dataclass
class ResolvedConfig:
    """Concrete values the engine runs with."""

    device: torch.device
    block_size: int
    num_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    max_waiting: int
    seed: int | None
    scheduling_policy: str = "fcfs"
    expanded_prefill: bool = False
    decode_graphs: str = "off"
    decode_graph_batch_sizes: tuple[int, ...] = ()
    triton_decode: bool = False
    state_snapshots: int = 0  # recurrent-state snapshot rows (hybrid models with prefix caching)
    # hybrid models with speculative decoding: state rows after the snapshots that hold a verifying
    # sequence's state after each of its drafts (num_speculative_tokens per sequence that may verify)
    spec_state_rows: int = 0
    speculative: SpeculativeConfig | None = None  # speculative decoding (None: off)
    host_blocks: int = 0  # blocks of the host cache tier (0: off)
    host_block_bytes: int = 0  # bytes per host block (latent rows of every layer, plus MoBA page sums)
    kv_cache_dtype: torch.dtype | None = None  # the pool's storage dtype (None: the model's)
    disk_cache_dir: str | None = None  # the disk tier's directory (None: off)
    disk_cache_bytes: int | None = None  # its cap (None: the default, DEFAULT_DISK_CACHE_BYTES or less)


SPEC_STATE_SEQS = 8  # hybrid models: sequences that may verify drafts in one step (state rows per draft each)


def resolve(cfg: EngineConfig, model_config, device: torch.device, dtype: torch.dtype,
            draft_config=None, extra_latent_layers: int = 0) -> ResolvedConfig:
    """Fill in defaults for ``device``; size the pool (call after the model, and the draft model
    whose config is ``draft_config`` if any, are on the device: a block then holds both latents)."""
    cfg.validate()
    on_cuda = device.type == "cuda"
    block_size = cfg.block_size or (64 if on_cuda else 16)
    kv_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, dtype)
    per_block = bytes_per_block(model_config, block_size, kv_dtype)
    if draft_config is not None:  # the draft's latents, in the same cache dtype
        per_block += bytes_per_block(draft_config, block_size, kv_dtype)
    if extra_latent_layers:  # the MTP layers' latents
        per_block += extra_latent_layers * block_size * entry_bytes(model_config.latent_dim, kv_dtype)
    # hybrid models (KDA layers): each running sequence also holds a recurrent-state slot, and prefix
    # caching keeps snapshots of that state (state_snapshots rows of the same size)
    per_state = model_config.kda_state_bytes(torch.empty(0, dtype=dtype).element_size())
    snapshots = 0
    if per_state and cfg.enable_prefix_caching:
        snapshots = cfg.max_num_seqs if cfg.state_snapshots is None else cfg.state_snapshots
    # speculative decoding on a hybrid model: the state after each draft of a verification span is kept
    # until the step's outcome is known (SPEC_STATE_SEQS sequences may verify drafts per step)
    speculative = cfg.speculative_config()
    if speculative is not None and speculative.method == "mtp":
        if cfg.host_cache_bytes():
            raise ValueError("engine argument speculative='mtp' cannot be combined with host_cache_memory: blocks "
                             "copied back from host memory would lack the MTP layer's latents; turn one of them off")
    spec_rows = 0
    if per_state and speculative is not None:
        spec_rows = speculative.num_speculative_tokens * min(cfg.max_num_seqs, SPEC_STATE_SEQS)
    state_bytes = (cfg.max_num_seqs + snapshots + spec_rows) * per_state
    wanted_len = min(cfg.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
    if cfg.max_model_len and cfg.max_model_len > model_config.max_position_embeddings:
        raise ValueError(f"max_model_len={cfg.max_model_len} exceeds the model's max_position_embeddings "
                         f"({model_config.max_position_embeddings})")
    useful_blocks = cfg.max_num_seqs * -(-wanted_len // block_size)  # enough for every sequence at full length

    if cfg.num_blocks is not None:
        num_blocks = cfg.num_blocks
    else:
        if cfg.kv_cache_memory is not None:
            budget = parse_bytes(cfg.kv_cache_memory)
        else:
            fraction = cfg.kv_cache_fraction or (CUDA_KV_FRACTION if on_cuda else CPU_KV_FRACTION)
            budget = int(available_memory(device) * fraction)
            if not on_cuda and cfg.kv_cache_fraction is None:
                budget = min(budget, CPU_KV_MAX_BYTES)
        budget -= state_bytes
        num_blocks = min(budget // per_block, useful_blocks)
        if num_blocks < 1:
            fix = "raise kv_cache_memory"
            if state_bytes:
                fix += (f" (the KDA state takes {state_bytes} bytes of it: {cfg.max_num_seqs} slots + {snapshots} "
                        f"snapshots" + (f" + {spec_rows} speculative-decoding rows" if spec_rows else "") +
                        "; or lower max_num_seqs / state_snapshots)")
            raise ValueError(f"the KV cache budget ({budget} bytes) is smaller than one block ({per_block} bytes: "
                             f"{block_size} tokens x {len(latent_layer_ids(model_config))} layers x "
                             f"{model_config.latent_dim} values in {kv_dtype}); {fix}")
    max_model_len = min(wanted_len, num_blocks * block_size)
    if cfg.max_num_batched_tokens is not None:
        max_batched = cfg.max_num_batched_tokens
    else:
        max_batched = 8192 if on_cuda else 512
    if not cfg.enable_chunked_prefill:
        max_batched = max(max_batched, max_model_len)  # a whole prompt must fit one step
    triton_decode = False
    if on_cuda and cfg.decode_kernel != "reference":  # importing Triton costs start-up time: only where it can run
        from ..kernels import mla_decode

        triton_decode = mla_decode.available()
    if cfg.decode_kernel == "triton" and not triton_decode:
        raise ValueError("engine argument decode_kernel='triton' needs a CUDA GPU (compute capability >= 8.0) and "
                         "the triton package; use 'reference'")
    graphs = cfg.decode_graphs or ("cuda" if on_cuda else "off")
    if speculative is not None and speculative.method == "mtp":
        # every step keeps its hidden states for the MTP layer: no graph replays
        if cfg.decode_graphs not in (None, "off"):
            raise ValueError(f"engine argument decode_graphs={cfg.decode_graphs!r} cannot be used with "
                             "speculative='mtp' (the MTP layer reads every step's hidden states, which graph "
                             "replays do not keep); leave decode_graphs unset or 'off'")
        graphs = "off"
    if graphs == "cuda" and not on_cuda:
        raise ValueError("engine argument decode_graphs='cuda' needs a CUDA device; use 'eager' or 'off'")
    from .cuda_graph import DEFAULT_BATCH_SIZES

    host_blocks, host_block_bytes = host_cache_blocks(cfg, model_config, block_size, kv_dtype)
    check_disk_cache(cfg, model_config, speculative)
    sizes = cfg.decode_graph_batch_sizes or tuple(b for b in DEFAULT_BATCH_SIZES if b < cfg.max_num_seqs)
    graph_sizes = tuple(sorted({min(b, cfg.max_num_seqs) for b in sizes} | {cfg.max_num_seqs})) \
        if graphs != "off" else ()
    return ResolvedConfig(
        device=device, block_size=block_size, num_blocks=num_blocks, max_model_len=max_model_len,
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=max_batched,
        enable_prefix_caching=cfg.enable_prefix_caching, enable_chunked_prefill=cfg.enable_chunked_prefill,
        max_waiting=cfg.max_waiting, seed=cfg.seed, scheduling_policy=cfg.scheduling_policy,
        expanded_prefill=(cfg.prefill_attention or ("expanded" if on_cuda else "absorbed")) == "expanded",
        decode_graphs=graphs, decode_graph_batch_sizes=graph_sizes, triton_decode=triton_decode,
        state_snapshots=snapshots, spec_state_rows=spec_rows, speculative=speculative, host_blocks=host_blocks,
        host_block_bytes=host_block_bytes, kv_cache_dtype=kv_dtype,
        disk_cache_dir=os.fspath(cfg.disk_cache_dir) if cfg.disk_cache_dir is not None else None,
        disk_cache_bytes=cfg.disk_cache_bytes(),
    )


def host_cache_blocks(cfg: EngineConfig, model_config, block_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(blocks, bytes per block) of the host cache tier for ``cfg.host_cache_memory``; (0, 0) when off.
    ``dtype``: the device pool's storage dtype (an FP8 pool's host blocks hold its scales too).
    ValueError when the tier cannot be used: prefix caching off, a hybrid (KDA) model, less than one
    block, more than the host's available memory."""
    size = cfg.host_cache_bytes()
    if not size:
        return 0, 0
    given = f"engine argument host_cache_memory={cfg.host_cache_memory!r}"
    if not cfg.enable_prefix_caching:
        raise ValueError(f"{given}: the host cache tier keeps prefix-cache blocks, but prefix caching is off; turn "
                         f"it on or leave host_cache_memory at 0")
    if model_config.kda_layer_ids:
        raise ValueError(f"{given}: the host cache tier does not support models with KDA layers (Kimi Linear, "
                         f"layers {list(model_config.kda_layer_ids)}): a prefix hit there also needs the recurrent-"
                         f"state snapshot at the chain's end, which stays on the device; leave host_cache_memory at "
                         f"0 for this model")
    from .host_cache import HostCachePool

    moba_layers = sum(model_config.is_moba_layer(i) for i in range(model_config.num_hidden_layers))
    per_block = HostCachePool.bytes_per_block(len(latent_layer_ids(model_config)), block_size,
                                              model_config.latent_dim, dtype, moba_layers)
    blocks = size // per_block
    if blocks < 1:
        raise ValueError(f"{given} ({size} bytes) is smaller than one host block ({per_block} bytes: {block_size} "
                         f"tokens x {len(latent_layer_ids(model_config))} layers x {model_config.latent_dim} "
                         f"values); raise it or set 0 to turn the tier off")
    free = available_memory(torch.device("cpu"))
    if size > free:
        raise ValueError(f"{given} ({size} bytes) is more than the host's available memory ({free} bytes); lower it")
    return blocks, per_block


def check_disk_cache(cfg: EngineConfig, model_config, speculative: SpeculativeConfig | None) -> None:
    """ValueError when the disk tier (``cfg.disk_cache_dir``) cannot be used with these settings: prefix
    caching off, a hybrid (KDA) model, MTP drafting, tensor parallelism. (Its size is checked against the
    block size and the free space when the directory is opened, ``disk_cache.open_disk_cache``.)"""
    if cfg.disk_cache_dir is None:
        return
    given = f"engine argument disk_cache_dir={os.fspath(cfg.disk_cache_dir)!r}"
    if not cfg.enable_prefix_caching:
        raise ValueError(f"{given}: the disk tier keeps prefix-cache blocks, but prefix caching is off; turn it on "
                         f"or leave disk_cache_dir unset")
    if model_config.kda_layer_ids:
        raise ValueError(f"{given}: the disk tier does not support models with KDA layers (Kimi Linear, layers "
                         f"{list(model_config.kda_layer_ids)}): a prefix hit there also needs the recurrent-state "
                         f"snapshot at the chain's end, which is not written to disk; leave disk_cache_dir unset")
    if speculative is not None and speculative.method == "mtp":
        raise ValueError(f"{given} cannot be combined with speculative='mtp': blocks read back from disk would lack "
                         f"the MTP layer's latents; turn one of them off")
    if cfg.tensor_parallel_size > 1:
        raise ValueError(f"{given} with tensor_parallel_size={cfg.tensor_parallel_size}: the disk tier runs on a "
                         f"single process only for now; leave disk_cache_dir unset or use tensor_parallel_size=1")


def add_engine_cli_args(parser) -> None:
    """Add the engine's settings as command-line flags (for `moonlet serve`, `moonlet bench` ...)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--kv-cache-memory", default=None,
                   help="bytes for the latent KV cache pool, e.g. 512MiB or 4GiB (default: a fraction of free memory)")
    g.add_argument("--kv-cache-fraction", type=float, default=None,
                   help="fraction of free memory for the KV cache (default 0.8 on GPU; 0.05, at most 1 GiB, on CPU)")
    g.add_argument("--num-blocks", type=int, default=None,
                   help="KV cache blocks (overrides --kv-cache-memory/--kv-cache-fraction)")
    g.add_argument("--block-size", type=int, default=None, help="tokens per cache block (default 16 on CPU, 64 on GPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one step (default 128)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step (default 512 on CPU, 8192 on GPU)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn off prefix caching")
    g.add_argument("--state-snapshots", type=int, default=None,
                   help="hybrid (Kimi Linear) models: recurrent-state snapshots kept for prefix-cache hits, each "
                        "as large as one sequence's KDA state and taken from the KV cache memory "
                        "(default: max-num-seqs; 0 turns prefix hits off for such models)")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="compute each prompt in one step")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="waiting requests beyond which new ones are refused as overloaded (default 1024)")
    g.add_argument("--scheduling-policy", choices=list(SCHEDULING_POLICIES), default=None,
                   help="which waiting request runs next and which running one is preempted first: fcfs (arrival "
                        "order) or priority (the request's priority, lower first, then arrival; default fcfs)")
    g.add_argument("--prefill-attention", choices=["expanded", "absorbed"], default=None,
                   help="prefill on expanded per-head keys/values or over the latents (default: expanded on GPU, "
                        "absorbed on CPU)")
    g.add_argument("--decode-kernel", choices=["triton", "reference"], default=None,
                   help="MLA decode attention kernel (default: triton on GPU when installed)")
    g.add_argument("--decode-graphs", choices=["cuda", "eager", "off"], default=None,
                   help="replay decode steps from CUDA graphs (default: cuda on GPU, off on CPU)")
    g.add_argument("--speculative", choices=list(SPECULATIVE_METHODS), default=None,
                   help="speculative decoding: 'ngram' drafts continuations of earlier occurrences of each "
                        "sequence's last tokens (prompt lookup), 'draft' the greedy continuation of a smaller model "
                        "(--speculative-model), 'mtp' the checkpoint's multi-token-prediction layer (DeepSeek-V3); "
                        "the drafts are verified in the same forward and the output does not change (default: off)")
    g.add_argument("--speculative-model", default=None, metavar="PATH",
                   help="with --speculative draft: the draft model's checkpoint directory (a smaller model with the "
                        "same tokenizer); with mtp: where the MTP layer is (default: the model's own directory)")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="with --speculative: most draft tokens per sequence and step (default 4)")
    g.add_argument("--ngram-max", type=int, default=None,
                   help="with --speculative ngram: longest suffix matched, tried first (default 4)")
    g.add_argument("--ngram-min", type=int, default=None,
                   help="with --speculative ngram: shortest suffix matched (default 2; 1 also drafts after "
                        "single-token matches, which are more often wrong)")
    g.add_argument("--image-feature-cache-memory", default=None,
                   help="vision models: bytes of projected image features kept by image content, so an image "
                        "sent again is not re-encoded, e.g. 256MiB (default 256MiB; 0 turns it off)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="split the model over this many processes (GPUs cuda:0..N-1; gloo on CPU): heads, MLP "
                        "columns and vocabulary split N ways, routed experts spread over the ranks (default 1)")
    g.add_argument("--quantization", choices=["keep", "dequantize"], default=None,
                   help="quantized checkpoints (block FP8, INT4 experts): keep the stored weights and compute "
                        "from them, or dequantize them to --dtype while loading (default: keep on GPU, "
                        "dequantize on CPU)")
    g.add_argument("--host-cache-memory", default=None,
                   help="host memory for a second tier of the prefix cache, e.g. 8GiB: cached blocks evicted from "
                        "the device pool are kept there and copied back on a later prefix hit instead of being "
                        "recomputed (pinned memory on GPU; not for hybrid Kimi Linear models; default 0: off)")
    g.add_argument("--disk-cache-dir", default=None, metavar="DIR",
                   help="directory for a disk tier of the prefix cache: every cached block is also written there "
                        "(in the background) and read back on a later prefix hit, also after a restart; one "
                        "subdirectory per model and cache layout (not for hybrid Kimi Linear models, --speculative "
                        "mtp or tensor parallelism; default: off)")
    g.add_argument("--disk-cache-size", default=None,
                   help="with --disk-cache-dir: its size cap, e.g. 20GiB; least recently used blocks are deleted "
                        "first (default 10GiB, at most half the free space)")
    g.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                   help="latent KV cache storage: auto (the model dtype) or fp8 (float8_e4m3fn with per-token "
                        "scales for the latent and k_pe: about half the bytes per token, twice the tokens in the "
                        "same memory; default auto)")
    g.add_argument("--lora", default=None, metavar="PATH",
                   help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) merged into "
                        "the weights at load time (quantized checkpoints are then dequantized; not with "
                        "--tensor-parallel-size > 1)")
    g.add_argument("--enable-lora", action="store_true", default=None,
                   help="serve LoRA adapters unmerged, several at once, selected per request (by model name in "
                        "the APIs); adapters come from --lora-modules or are added at run time")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters served unmerged over the base model, each a PEFT adapter directory under "
                        "a name that requests select (the APIs' model field); implies --enable-lora")
    g.add_argument("--max-loras", type=int, default=None,
                   help="LoRA adapters resident on the device at once; others wait in host memory and replace "
                        "the least recently used one no running request holds (default 4)")
    g.add_argument("--max-lora-rank", type=int, default=None,
                   help="largest LoRA rank an adapter may have; every resident slot is padded to it (default 16)")
    g.add_argument("--max-lora-wait-steps", type=int, default=None,
                   help="steps a request may wait for its LoRA adapter to get a resident slot while later "
                        "adapter requests pass it; then they stop passing it (default 32)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model and cache dtype (default: the checkpoint's)")
    g.add_argument("--engine-seed", dest="engine_seed", type=int, default=None,
                   help="seed for requests that bring none")


def engine_args_from_cli(args) -> dict:
    """The EngineConfig keyword arguments from flags added by ``add_engine_cli_args``: only the flags
    given, so EngineConfig's own defaults apply to the rest."""
    names = dict(
        kv_cache_memory="kv_cache_memory", kv_cache_fraction="kv_cache_fraction", num_blocks="num_blocks",
        block_size="block_size", max_model_len="max_model_len", max_num_seqs="max_num_seqs",
        max_num_batched_tokens="max_num_batched_tokens", max_waiting="max_waiting", device="device", dtype="dtype",
        engine_seed="seed", prefill_attention="prefill_attention", decode_graphs="decode_graphs",
        decode_kernel="decode_kernel", state_snapshots="state_snapshots", speculative="speculative",
        speculative_model="speculative_model",
        num_speculative_tokens="num_speculative_tokens", ngram_max="ngram_max", ngram_min="ngram_min",
        image_feature_cache_memory="image_feature_cache_memory", tensor_parallel_size="tensor_parallel_size",
        quantization="quantization", host_cache_memory="host_cache_memory", kv_cache_dtype="kv_cache_dtype",
        lora="lora", enable_lora="enable_lora", max_loras="max_loras", max_lora_rank="max_lora_rank",
        max_lora_wait_steps="max_lora_wait_steps", scheduling_policy="scheduling_policy",
    )
    names.update(disk_cache_dir="disk_cache_dir", disk_cache_size="disk_cache_size")
    out = {field: getattr(args, attr) for attr, field in names.items() if getattr(args, attr, None) is not None}
    if getattr(args, "lora_modules", None):
        out["lora_modules"] = parse_lora_modules(args.lora_modules)
    for flag in ("enable_prefix_caching", "enable_chunked_prefill"):
        if getattr(args, flag, True) is False:
            out[flag] = False
    return out


def parse_lora_modules(items) -> dict[str, str]:
    """``--lora-modules`` values (``name=path`` each) -> {name: path}; ValueError naming a bad item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {item!r}: write each adapter as NAME=PATH (a PEFT adapter directory)")
        if name in out:
            raise ValueError(f"--lora-modules names {name!r} twice; give each adapter its own name")
        out[name] = path
    return out
