"""Moonlight-16B-A3B on one GPU: moonlet's engine vs transformers' generate, against the hardware floor.

    PYTHONPATH=. python bench/gpu_moonlight.py --json moonlight.json           # the issue-6 measurement
    python bench/gpu_moonlight.py --preset tiny-k2 --device cpu --prefill-len 64 \\
        --batches 1,2 --decode-steps 4                                           # a CPU smoke run

One run builds the shape (``--preset``, random weights, bf16 on CUDA / float32 on CPU) twice, with
identical weights: as a moonlet ``Transformer`` served by ``moonlet.engine`` and as transformers'
``DeepseekV3ForCausalLM`` driven by ``generate``. It prints one table for both:

- prefill tokens/s: one request of ``--prefill-len`` random tokens generating one token (the time
  to first token: moonlet ``LLM.generate(max_tokens=1)``, transformers ``generate(max_new_tokens=1)``);
- decode ms/step at each ``--batches`` size B: B requests of ``--prompt-len`` random tokens, each
  generating N = ``--decode-steps`` tokens, greedy; ms/step = time from the first generated token
  to the last / (N - 1), so prefill and set-up are excluded the same way for both. moonlet: the
  engine is stepped directly and the timed steps are checked to be pure decode steps of all B
  sequences. transformers: ``generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`` with a
  streamer that marks each token as it is ready (a CUDA event); DynamicCache, the default
  (``--hf-cache static`` for the static one, which also makes transformers compile);
- KV-cache bytes per token: moonlet's pool bytes / pool slots; transformers' cache tensors after a
  generate / (batch x cached tokens);
- peak memory: ``torch.cuda.max_memory_allocated``, reset before each system's measurements
  (weights included; model building excluded). On CPU the peak resident set size sampled during them;
- the batch-1 decode floor: bytes of the weights one batch-1 decode step must read
  (``decode_weight_bytes``) / the bandwidth of a large device-to-device copy (read + write bytes / time).

Times are medians of ``--repeats`` runs after ``--warmup`` runs, between ``torch.cuda.synchronize``
points, measured with CUDA events (``time.perf_counter`` on CPU).

Checks, printed under the table (the exit status is 1 when one fails), on a short prompt
(``--check-prompt-len``):
- logits: moonlet's model forward vs transformers', by the median over positions of each
  position's relative error (robust to the odd position where rounding flipped an MoE routing
  near-tie). In bf16 the bound comes from the same run: transformers is also run in float32 as the
  truth, and moonlet in bf16 must be no further from it than twice transformers in bf16 (+1e-3);
  measured on CPU both sit about 1% away for small shapes and over 10% (whole-tensor) through 27
  random Moonlight layers, so a fixed bound would either miss bugs or fail correct code. In float32
  (or with ``--no-fp32-reference``) the bound is fixed (LOGITS_TOLERANCE);
- greedy tokens: moonlet's engine on ``--device`` in the benchmark dtype vs the engine on CPU in
  float32 with the same (rounded) weights. The CPU side runs a copy of the shape cut to
  ``--check-layers`` layers (default 4: the dense layer and three MoE layers, full width and
  vocabulary), because all 27 layers in float32 are slow on CPU and 64 GB; both sides use that
  copy. Identical sequences pass. Otherwise each of the device's tokens is judged teacher-forced
  against the CPU model's logits given the device's own prefix: it must be the reference's argmax,
  or within a near-tie (reference margin <= 4 x the rms logit difference between the device model
  and the reference at that step), since bf16 rounding decides near-ties either way. On CPU, bf16
  against float32 on a 4-layer Moonlight copy (16 experts, 16K vocabulary) gave 14-15 of 16 tokens
  equal and the rest near-ties with margins below 0.09 (logit std 0.9).

Random weights: every tensor drawn from its own generator seeded by (--seed, tensor name), normal
with std = initializer_range (0.02, as ``Transformer.init_weights``), norms 1 + 0.1 N(0, 1), router
correction biases 0.05 N(0, 1) in float32, so both systems get bit-identical values without holding
two copies at once. Activations stay finite in bf16 through all 27 layers at this scale.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import platform
import re
import statistics
import sys
import threading
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import torch

try:
    import moonlet  # noqa: F401
except ImportError:  # run from a checkout without installing: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moonlet.config import PRESETS, ModelConfig, preset
from moonlet.model import Transformer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Median per-position relative error of logits allowed between moonlet and transformers, by dtype
# (in float32, or in bf16 with --no-fp32-reference).
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# A greedy step whose reference margin is within this many rms logit differences is a near-tie.
NEAR_TIE = 4.0
_RUNS = itertools.count()  # request ids of decode runs stay unique within the engine
EXPERT_NAME = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


# ---- the shape -------------------------------------------------------------------------------------
def resolve_config(name: str, layers: int | None = None) -> ModelConfig:
    """A preset name, 'tiny-k2' / 'tiny-v2-lite' (moonlet.testing), 'moonlet-tiny' (the bundled model's
    shape) or a config.json path; ``layers`` overrides num_hidden_layers."""
    from moonlet import testing

    if name == "tiny-k2":
        config = testing.tiny_k2_config()
    elif name == "tiny-v2-lite":
        config = testing.tiny_v2_lite_config()
    elif name == "moonlet-tiny":
        from moonlet.train.recipes.tiny import model_config

        config = ModelConfig.from_dict(model_config())
    elif name in PRESETS:
        config = preset(name)
    else:
        config = ModelConfig.from_pretrained(name)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    return config


def decode_weight_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Weights one batch-1 decode step reads: {'params': elements, 'bytes': bytes}.

    The embedding row of the token, every layer's attention and norm weights, dense MLP layers
    whole, per MoE layer the router (and its float32 correction bias), the shared experts and
    ``num_experts_per_tok`` routed experts; the final norm and the lm_head. Weights are ``dtype``;
    the router's correction bias stays float32 as the model keeps it.
    """
    H, nh = config.hidden_size, config.num_attention_heads
    elem = torch.empty(0, dtype=dtype).element_size()
    if config.q_lora_rank:
        q = H * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * nh * config.qk_head_dim
    else:
        q = H * nh * config.qk_head_dim
    kv_a = H * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank  # + kv_a_layernorm
    kv_b = config.kv_lora_rank * nh * (config.qk_nope_head_dim + config.v_head_dim)
    o = nh * config.v_head_dim * H
    layer_norms = 2 * H
    swiglu = lambda inter: 3 * H * inter  # noqa: E731 - gate, up, down
    params = fp32_params = 0
    for layer in range(config.num_hidden_layers):
        params += q + kv_a + kv_b + o + layer_norms
        if config.is_moe_layer(layer):
            E = config.n_routed_experts
            params += E * H  # router weight
            if config.topk_method == "noaux_tc":
                fp32_params += E  # e_score_correction_bias
            params += config.num_experts_per_tok * swiglu(config.moe_intermediate_size)
            params += swiglu(config.moe_intermediate_size * config.n_shared_experts) if config.n_shared_experts else 0
        else:
            params += swiglu(config.intermediate_size)
    params += H  # final norm
    params += config.vocab_size * H  # lm_head: every row, for the logits
    if not config.tie_word_embeddings:
        params += H  # one embedding row (tied: that row is part of the lm_head just counted)
    return {"params": params + fp32_params, "bytes": params * elem + fp32_params * 4}


# ---- random weights, the same in both systems ------------------------------------------------------
def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_tensor(name: str, shape, seed: int, device, std: float) -> torch.Tensor:
    """The float32 value of checkpoint tensor ``name``: a function of (seed, name, device type) only."""
    gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
    x = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    if name.endswith("e_score_correction_bias"):
        return x.mul_(0.05)
    if name.endswith("norm.weight"):
        return x.mul_(0.1).add_(1.0)
    return x.mul_(std)


def checkpoint_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """moonlet's checkpoint tensors by hub name: parameters and the router correction biases."""
    named = dict(model.named_parameters())
    named.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    return named


@torch.no_grad()
def build_moonlet(config: ModelConfig, device, dtype: torch.dtype, seed: int) -> Transformer:
    """A moonlet Transformer with the random weights, built straight on ``device`` in ``dtype``
    (on the meta device first, so no float32 copy of the whole model is ever made)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.cast(dtype)
    model.to_empty(device=device)
    for name, t in checkpoint_tensors(model).items():
        t.copy_(random_tensor(name, t.shape, seed, device, config.initializer_range))
    model.reset_buffers()
    return model.eval()


def transformers_config(config: ModelConfig):
    """transformers' DeepseekV3Config for a moonlet config (kimi_k2 is read as deepseek_v3, as Moonshot
    advises other frameworks to)."""
    import transformers

    fields = {k: v for k, v in config.to_dict().items() if k not in ("torch_dtype", "model_type")}
    return transformers.DeepseekV3Config(**fields)


def transformers_targets(hf) -> dict[str, torch.Tensor]:
    """transformers' checkpoint tensors by state-dict name (parameters and persistent buffers)."""
    return dict(hf.state_dict(keep_vars=True))


@torch.no_grad()
def load_into_transformers(hf, named_tensors, num_experts: int) -> None:
    """Copy moonlet-named (hub-named) tensors into a transformers DeepseekV3 model.

    Names are shared except the routed experts: hub ``...experts.E.{gate,up,down}_proj.weight``
    go into transformers' stacked ``...experts.gate_up_proj`` [E, 2I, H] (gate rows first) and
    ``...experts.down_proj`` [E, H, I] (each transposed when the module says ``is_transposed``).
    Raises if any target tensor is left unfilled or any name has no target.
    """
    targets = transformers_targets(hf)
    modules = dict(hf.named_modules())
    filled: dict[str, int] = {}
    for name, value in named_tensors:
        m = EXPERT_NAME.match(name)
        if m is None:
            if name not in targets:
                raise KeyError(f"transformers' model has no tensor {name!r}")
            targets[name].copy_(value)
            filled[name] = filled.get(name, 0) + 1
            continue
        prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
        transposed = bool(getattr(modules[prefix], "is_transposed", False))
        target = f"{prefix}.{'down_proj' if kind == 'down' else 'gate_up_proj'}"
        w = value.t() if transposed else value  # hub [out, in]
        dest = targets[target][e]
        if kind != "down":
            inter = w.shape[1] if transposed else w.shape[0]
            half = slice(0, inter) if kind == "gate" else slice(inter, 2 * inter)
            dest = dest[:, half] if transposed else dest[half]
        dest.copy_(w)
        filled[target] = filled.get(target, 0) + 1
    for name in targets:
        want = (2 * num_experts if name.endswith("gate_up_proj") else num_experts) if ".experts." in name else 1
        if filled.get(name, 0) != want:
            raise RuntimeError(f"transformers tensor {name!r} filled {filled.get(name, 0)} times, want {want}")


@torch.no_grad()
def build_transformers(config: ModelConfig, device, dtype: torch.dtype, seed: int, attn: str = "sdpa"):
    """transformers' DeepseekV3ForCausalLM with the same random weights as ``build_moonlet``."""
    import transformers

    with torch.device("meta"):
        reference = Transformer(config)  # only for the names and shapes of the checkpoint tensors
    specs = [(n, tuple(t.shape)) for n, t in checkpoint_tensors(reference).items()]
    del reference
    with torch.device(device):
        hf = transformers.DeepseekV3ForCausalLM._from_config(transformers_config(config), dtype=dtype,
                                                             attn_implementation=attn)
    for module in hf.modules():  # float32 like moonlet's (transformers keeps it so when loading)
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor) and bias.dtype != torch.float32:
            module.e_score_correction_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    tensors = ((n, random_tensor(n, s, seed, device, config.initializer_range)) for n, s in specs)
    load_into_transformers(hf, tensors, config.n_routed_experts)
    gc_ = hf.generation_config
    gc_.eos_token_id, gc_.pad_token_id, gc_.bos_token_id = None, 0, None  # generate exactly what is asked
    return hf.eval()


# ---- timing and memory -----------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StopWatch:
    """Seconds between start() and stop(): CUDA events on a GPU (after a synchronize), else perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self._a, self._b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            self._b.record()
            self._b.synchronize()
            return self._a.elapsed_time(self._b) / 1000
        return time.perf_counter() - self._t


def median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() over ``repeats`` runs after ``warmup`` untimed ones; fn(i) gets the run index."""
    watch = StopWatch(device)
    for i in range(warmup):
        fn(-1 - i)
    times = []
    for i in range(repeats):
        watch.start()
        fn(i)
        times.append(watch.stop())
    return statistics.median(times)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # not Linux: the process high-water mark (not resettable)
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak memory while the block runs: max_memory_allocated on CUDA; on CPU the peak resident set
    size sampled every 2 ms (the whole process's, so it includes whatever else is resident)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak = _rss_bytes()

            def sample():
                while not self._stop.wait(0.002):
                    self.peak = max(self.peak, _rss_bytes())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def resident_bytes(device: torch.device) -> int:
    """Memory held now: allocated GPU memory (weights, pools, caches), or the process RSS on CPU."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.memory_allocated(device)
    return _rss_bytes()


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes/s of a large copy on ``device`` (bytes read + bytes written, per second)."""
    if nbytes is None:
        nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda _: dst.copy_(src), device, warmup=3, repeats=repeats)
    del src, dst
    free_memory(device)
    return 2 * nbytes / seconds


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_ids(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=gen).tolist()


# ---- moonlet ---------------------------------------------------------------------------------------
def make_llm(model: Transformer, tokens: int, max_seqs: int, max_batched: int):
    """The engine over ``model`` with a KV pool of at least ``tokens`` slots (plus block rounding)."""
    from moonlet.engine import LLM

    per_token = model.config.num_hidden_layers * model.config.latent_dim * model.dtype.itemsize
    return LLM(model=model, tokenizer=None, kv_cache_memory=per_token * tokens, max_num_seqs=max_seqs,
               max_num_batched_tokens=max_batched, seed=0)


def engine_decode_seconds(llm, prompts: list[list[int]], steps: int, watch: StopWatch) -> tuple[float, int]:
    """Add the prompts, step until each has its first token, then time the steps until all have
    ``steps`` tokens. Returns (seconds, steps timed); checks every timed step was a pure decode step
    of all the sequences."""
    from moonlet.engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    run = next(_RUNS)
    rids = [f"decode-{run}-{i}" for i in range(len(prompts))]
    counts = dict.fromkeys(rids, 0)
    for rid, ids in zip(rids, prompts):
        engine.add_request(rid, ids, params)
    while min(counts.values()) == 0:
        for out in engine.step():
            counts[out.request_id] = len(out.token_ids)
    if max(counts.values()) != 1:
        raise RuntimeError(f"some requests got a second token before all had their first ({counts}); "
                           f"raise max_num_batched_tokens so the prompts prefill together")
    stats = engine.stats()
    before, preempt = stats["steps"], stats["preemptions"]
    watch.start()
    while engine.has_unfinished():
        outs = engine.step()
        if len(outs) != len(prompts):
            raise RuntimeError(f"a decode step produced {len(outs)} tokens for {len(prompts)} sequences")
        for out in outs:
            counts[out.request_id] = len(out.token_ids)
    seconds = watch.stop()
    stats = engine.stats()
    timed, preempted = stats["steps"] - before, stats["preemptions"] - preempt
    if preempted or timed != steps - 1 or set(counts.values()) != {steps}:
        raise RuntimeError(f"decode run was not {steps - 1} clean steps: {timed} steps, {preempted} preemptions, "
                           f"token counts {set(counts.values())}")
    return seconds, timed


def bench_moonlet(model: Transformer, args, device: torch.device) -> dict:
    """Prefill tokens/s, decode ms/step per batch, KV bytes/token and peak memory through the engine."""
    from moonlet.engine import SamplingParams

    vocab = model.config.vocab_size
    max_b = max(args.batches)
    block_pad = 128  # covers block rounding for any block size up to 128
    tokens = max(max_b * (args.prompt_len + args.decode_steps + block_pad), args.prefill_len + block_pad)
    default_batched = 8192 if device.type == "cuda" else 512
    max_batched = max(default_batched, args.prefill_len, max_b * args.prompt_len)
    llm = make_llm(model, tokens, max_b, max_batched)
    engine = llm.engine
    out: dict = {"engine": {"block_size": engine.config.block_size, "num_blocks": engine.config.num_blocks,
                            "max_num_batched_tokens": engine.config.max_num_batched_tokens,
                            "max_num_seqs": engine.config.max_num_seqs}}
    watch = StopWatch(device)
    out["resident_before_bytes"] = resident_bytes(device)
    with PeakMemory(device) as mem:
        first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        hits = engine.stats()["prefix_cache_hits"]

        # fresh tokens every run, so the prefix cache never hits
        prompts = {i: random_ids(1, args.prefill_len, vocab, seed=1000 + i) for i in range(-args.warmup, args.repeats)}

        def prefill(i: int) -> None:
            llm.generate(prompts[i], first)

        seconds = median_seconds(prefill, device, args.warmup, args.repeats)
        if engine.stats()["prefix_cache_hits"] != hits:
            raise RuntimeError("the prefill prompts hit the prefix cache; the measurement would be wrong")
        out["prefill_tok_s"] = args.prefill_len / seconds
        out["prefill_seconds"] = seconds
        out["decode_ms_per_step"] = {}
        for b in args.batches:
            runs = []
            for r in range(-args.warmup, args.repeats):
                prompts = random_ids(b, args.prompt_len, vocab, seed=2000 + 97 * b + r)
                s, n = engine_decode_seconds(llm, prompts, args.decode_steps, watch)
                if r >= 0:
                    runs.append(1000 * s / n)
            out["decode_ms_per_step"][str(b)] = statistics.median(runs)
    out["peak_memory_bytes"] = mem.peak
    pool = engine.pool
    out["kv_bytes_per_token"] = pool.nbytes / (pool.num_blocks * pool.block_size)
    del llm, engine
    free_memory(device)
    return out


# ---- transformers ----------------------------------------------------------------------------------
def hf_generate(hf, ids: torch.Tensor, n: int, cache: str, streamer=None):
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, return_dict_in_generate=True, streamer=streamer, **kwargs)


def step_clock(device: torch.device):
    """A transformers streamer that marks the moment each generated token is ready.

    ``generate`` calls ``put`` once with the prompt, then once per generated token (after that
    token's forward). On CUDA each mark is an event recorded there, so the time between two marks
    is the device's timeline between the two tokens (host gaps included); on CPU perf_counter.
    ``decode_seconds()`` -> (seconds from the first generated token to the last, decode steps).
    """
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self):
            self.marks = []

        def put(self, value) -> None:
            if device.type == "cuda":
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.marks.append(event)
            else:
                self.marks.append(time.perf_counter())

        def end(self) -> None:
            pass

        def decode_seconds(self) -> tuple[float, int]:
            first, last = self.marks[1], self.marks[-1]
            if device.type == "cuda":
                last.synchronize()
                return first.elapsed_time(last) / 1000, len(self.marks) - 2
            return last - first, len(self.marks) - 2

    return StepClock()


def cache_bytes_per_token(cache, batch: int) -> float:
    """Bytes of a transformers cache's tensors per cached token (per sequence of the batch)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    length = cache.get_max_cache_shape() if type(cache).__name__.startswith("Static") else cache.get_seq_length()
    if not total or not length:
        raise RuntimeError(f"could not read the tensors of transformers' {type(cache).__name__}")
    return total / (batch * length)


def bench_transformers(hf, args, device: torch.device) -> dict:
    vocab = hf.config.vocab_size
    out: dict = {"attn_implementation": hf.config._attn_implementation,
                 "experts_implementation": getattr(hf.config, "_experts_implementation", None),
                 "cache": args.hf_cache, "decode_ms_per_step": {}}

    def tensor(rows, length, seed):
        return torch.tensor(random_ids(rows, length, vocab, seed), device=device)

    out["resident_before_bytes"] = resident_bytes(device)
    with PeakMemory(device) as mem, torch.inference_mode():
        prefill_ids = [tensor(1, args.prefill_len, 3000 + i) for i in range(args.repeats)]
        seconds = median_seconds(lambda i: hf_generate(hf, prefill_ids[max(i, 0)], 1, args.hf_cache), device,
                                 args.warmup, args.repeats)
        out["prefill_tok_s"] = args.prefill_len / seconds
        out["prefill_seconds"] = seconds
        for b in args.batches:
            runs = []
            for r in range(-args.warmup, args.repeats):
                clock = step_clock(device)
                hf_generate(hf, tensor(b, args.prompt_len, 4000 + 97 * b + r), args.decode_steps, args.hf_cache, clock)
                seconds, steps = clock.decode_seconds()
                if steps != args.decode_steps - 1:
                    raise RuntimeError(f"transformers streamed {steps + 1} tokens, want {args.decode_steps}")
                if r >= 0:
                    runs.append(1000 * seconds / steps)
            out["decode_ms_per_step"][str(b)] = statistics.median(runs)
        result = hf_generate(hf, tensor(1, args.prompt_len, 5000), args.decode_steps, args.hf_cache)
        out["kv_bytes_per_token"] = cache_bytes_per_token(result.past_key_values, 1)
        del result
    out["peak_memory_bytes"] = mem.peak
    return out


# ---- checks ----------------------------------------------------------------------------------------
def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference|| over the whole tensors (Frobenius), in float32."""
    ours, reference = ours.float(), reference.float()
    return ((ours - reference).norm() / reference.norm()).item()


def median_position_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Median over positions of each position's relative error of logits [..., vocab]. Robust to the
    few positions where rounding flipped an MoE routing near-tie (those differ by tens of percent)."""
    ours, reference = ours.float(), reference.float()
    per_position = (ours - reference).norm(dim=-1) / reference.norm(dim=-1)
    return per_position.flatten().median().item()


def top1_agreement(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()


def logits_agreement(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                     truth: torch.Tensor | None = None) -> dict:
    """moonlet's logits (``ours``) against transformers' (``reference``), both run in ``dtype``.

    The measure is the median per-position relative error. Without ``truth``: it must be within
    LOGITS_TOLERANCE[dtype]. With ``truth`` (transformers' logits in float32 on the same weights):
    moonlet's distance to the truth must be at most twice transformers' own (+1e-3), which holds
    for a correct model in any precision and fails by far for a wrong one (errors near 1).
    """
    out = {"median_error": median_position_error(ours, reference), "relative_error": relative_error(ours, reference),
           "top1_agreement": top1_agreement(ours, reference)}
    if truth is None:
        out["tolerance"] = LOGITS_TOLERANCE[dtype]
        out["ok"] = math.isfinite(out["median_error"]) and out["median_error"] <= out["tolerance"]
        return out
    mine, theirs = median_position_error(ours, truth), median_position_error(reference, truth)
    out.update(moonlet_vs_fp32=mine, transformers_vs_fp32=theirs, tolerance=2 * theirs + 1e-3,
               moonlet_top1_vs_fp32=top1_agreement(ours, truth),
               transformers_top1_vs_fp32=top1_agreement(reference, truth))
    out["ok"] = math.isfinite(mine) and mine <= out["tolerance"]
    return out


def engine_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    from moonlet.engine import SamplingParams

    llm = make_llm(model, len(prompt) + n + 128, 1, 512)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
    return list(out.token_ids)


def judge_greedy(got: list[int], ref_logits: torch.Tensor, dev_logits: torch.Tensor) -> dict:
    """Teacher-forced judgement of the device's greedy tokens ``got`` [n].

    ref_logits / dev_logits [n, vocab]: the reference's (float32) and the device model's logits for
    each step, both given the device's own prefix. A step passes when the device's token is the
    reference's argmax, or when the reference's margin between its argmax and the device's token is
    at most NEAR_TIE x the root-mean-square logit difference between the two at that step: rounding
    moves each logit by about that much, so it can decide such a near-tie either way.
    """
    ref_logits, dev_logits = ref_logits.float(), dev_logits.float()
    got_t = torch.tensor(got)
    best = ref_logits.argmax(-1)
    margin = ref_logits.gather(1, best[:, None])[:, 0] - ref_logits.gather(1, got_t[:, None])[:, 0]
    noise = (dev_logits - ref_logits).pow(2).mean(-1).sqrt()
    agree = best == got_t
    near_tie = ~agree & (margin <= NEAR_TIE * noise)
    return {"agree": int(agree.sum()), "near_ties": int(near_tie.sum()),
            "failed_steps": [i for i in range(len(got)) if not (agree[i] or near_tie[i])],
            "margins_at_disagreement": [round(float(m), 5) for m in margin[~agree]],
            "rms_logit_noise": float(noise.max()), "logit_std": float(ref_logits.std())}


@torch.inference_mode()
def greedy_check(config: ModelConfig, args, device: torch.device, dtype: torch.dtype) -> dict:
    """moonlet's engine on ``device`` in ``dtype`` vs the engine on CPU in float32, same (rounded) weights.

    ``equal``: the two free-running greedy sequences are identical. ``ok``: ``equal``, or every
    step of the device's sequence passes ``judge_greedy`` against the CPU model's logits.
    """
    layers = args.check_layers or config.num_hidden_layers
    cfg = config.replace(num_hidden_layers=min(layers, config.num_hidden_layers))
    prompt = random_ids(1, args.check_prompt_len, cfg.vocab_size, seed=6000)[0]
    n = args.check_tokens
    model = build_moonlet(cfg, device, dtype, args.seed)
    got = engine_greedy(model, prompt, n)
    with torch.device("meta"):
        ref_model = Transformer(cfg)
    ref_model.to_empty(device="cpu")
    targets = ref_model.state_dict(keep_vars=True)
    source = model.state_dict()
    if set(targets) != set(source):
        raise RuntimeError(f"state dicts differ: {sorted(set(targets) ^ set(source))[:5]}")
    for name, t in source.items():  # one tensor at a time: no second full copy in memory
        targets[name].copy_(t)
    ref_model.reset_buffers()
    ref_model.eval()
    del targets, source
    want = engine_greedy(ref_model, prompt, n)
    ids = torch.tensor([prompt + got[:-1]])
    steps = slice(len(prompt) - 1, len(prompt) - 1 + n)  # logits that chose each generated token
    ref_logits = ref_model(ids)[0, steps]
    dev_logits = model(ids.to(device))[0, steps].float().cpu()
    out = {"layers": cfg.num_hidden_layers, "prompt_len": len(prompt), "tokens": n, "device_tokens": got,
           "reference_tokens": want, "equal": got == want, **judge_greedy(got, ref_logits, dev_logits)}
    out["ok"] = out["equal"] or not out["failed_steps"]
    del model, ref_model
    free_memory(device)
    return out


# ---- report ----------------------------------------------------------------------------------------
def table_rows(results: dict) -> list[tuple[str, str, str]]:
    """(metric, moonlet, transformers) rows of the printed table."""
    m, t = results["moonlet"], results.get("transformers")
    fmt_rate = lambda x: f"{x:,.0f}"  # noqa: E731
    fmt_ms = lambda x: f"{x:.2f}"  # noqa: E731

    def cell(part, fn):
        return "skipped" if part is None else fn(part)

    rows = [(f"prefill tokens/s @ {results['prefill_len']}", fmt_rate(m["prefill_tok_s"]),
             cell(t, lambda p: fmt_rate(p["prefill_tok_s"])))]
    for b in results["batches"]:
        key = str(b)
        rows.append((f"decode ms/step @ batch {b}", fmt_ms(m["decode_ms_per_step"][key]),
                     cell(t, lambda p: fmt_ms(p["decode_ms_per_step"][key]))))
        rows.append((f"decode tokens/s @ batch {b}", fmt_rate(1000 * b / m["decode_ms_per_step"][key]),
                     cell(t, lambda p: fmt_rate(1000 * b / p["decode_ms_per_step"][key]))))
    rows.append(("KV-cache bytes/token", f"{m['kv_bytes_per_token']:,.0f}",
                 cell(t, lambda p: f"{p['kv_bytes_per_token']:,.0f}")))
    rows.append(("peak memory GiB", f"{m['peak_memory_bytes'] / 2**30:.2f}",
                 cell(t, lambda p: f"{p['peak_memory_bytes'] / 2**30:.2f}")))
    floor = f"{results['floor_ms']:.3f}"
    rows.append(("batch-1 decode floor ms", floor, floor))
    return rows


def count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_report(results: dict) -> str:
    lines = [f"device: {results['device_name']} | torch {results['torch']} | transformers {results['transformers_version']}"
             f" | {results['date']}",
             f"shape: {results['preset']} ({results['config']['num_hidden_layers']} layers, "
             f"{count(results['params']['total'])} params, {count(results['params']['active'])} active) "
             f"| {results['dtype']} | prompts for decode: {results['prompt_len']} tokens, {results['decode_steps']} "
             f"generated | median of {results['repeats']} after {results['warmup']} warm-up",
             "", "| metric | moonlet | transformers |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table_rows(results)]
    w = results["weights_touched"]
    lines.append("")
    lines.append(f"floor = {w['bytes'] / 1e9:.4g} GB of weights per batch-1 step ({count(w['params'])} params) / "
                 f"{results['bandwidth_bytes_s'] / 1e9:.0f} GB/s measured copy bandwidth (read + write)")
    t = results.get("transformers")
    if t is not None:
        lines.append(f"transformers: generate, {t['cache']} cache, attention {t['attn_implementation']}, "
                     f"experts {t['experts_implementation']}")
    e = results["moonlet"]["engine"]
    lines.append(f"moonlet engine: block size {e['block_size']}, {e['num_blocks']} blocks, "
                 f"max_num_batched_tokens {e['max_num_batched_tokens']}")
    checks = results["checks"]
    if "logits" in checks:
        c = checks["logits"]
        line = (f"check logits, moonlet vs transformers in {results['dtype']} on a {results['check_prompt_len']}-token "
                f"prompt: median per-position relative error {c['median_error']:.2e} (whole tensor "
                f"{c['relative_error']:.2e}), top-1 agreement {100 * c['top1_agreement']:.1f}%")
        if "moonlet_vs_fp32" in c:
            line += (f"; against transformers in float32: moonlet {c['moonlet_vs_fp32']:.2e}, transformers "
                     f"{c['transformers_vs_fp32']:.2e} (moonlet must be <= {c['tolerance']:.2e})")
        else:
            line += f" (tolerance {c['tolerance']:.0e})"
        lines.append(f"{line} -> {'ok' if c['ok'] else 'FAILED'}")
    if "greedy" in checks:
        c = checks["greedy"]
        if c["equal"]:
            verdict = "same tokens -> ok"
        else:
            verdict = (f"sequences differ; teacher-forced on the device's tokens: {c['agree']}/{c['tokens']} are the "
                       f"reference's argmax, {c['near_ties']} near-ties (margins {c['margins_at_disagreement']} <= "
                       f"{NEAR_TIE:g} x rms logit difference, at most {c['rms_logit_noise']:.3g}; logit std "
                       f"{c['logit_std']:.3g}), failed steps {c['failed_steps']} -> {'ok' if c['ok'] else 'FAILED'}")
        lines.append(f"check greedy tokens, engine on {results['device']} in {results['dtype']} vs engine on CPU in "
                     f"float32 ({c['layers']}-layer copy, {c['prompt_len']}-token prompt, {c['tokens']} tokens): "
                     f"{verdict}")
    lines += [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines)


def write_json(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moonlight-16b-a3b",
                   help="a preset name, tiny-k2, tiny-v2-lite, moonlet-tiny or a config.json path")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke runs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--skip-transformers", action="store_true", help="measure moonlet only")
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--batches", default="1,8,64", help="decode batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before decode")
    p.add_argument("--decode-steps", type=int, default=64, help="tokens each decode request generates (>= 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-cache", choices=["dynamic", "static"], default="dynamic")
    p.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--check-layers", type=int, default=4,
                   help="layers of the copy used for the greedy check against the CPU reference (0: all)")
    p.add_argument("--no-fp32-reference", action="store_true",
                   help="judge the bf16 logits by the fixed tolerance instead of against transformers in float32 "
                        "(which needs memory for the float32 model: 64 GB for Moonlight)")
    p.add_argument("--check-prompt-len", type=int, default=32, help="prompt tokens for both checks")
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write every number here (rewritten after each part)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.decode_steps < 2 or not args.batches or min(args.batches) < 1 or args.repeats < 1:
        p.error("--decode-steps must be >= 2, --batches positive integers, --repeats >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = resolve_config(args.preset, args.layers)
    if args.prefill_len + 1 > config.max_position_embeddings:
        print(f"--prefill-len {args.prefill_len} exceeds the shape's context ({config.max_position_embeddings})",
              file=sys.stderr)
        return 2
    if config.model_type == "deepseek_v2" and not args.skip_transformers:
        print("the transformers side is DeepseekV3ForCausalLM; a deepseek_v2 shape needs --skip-transformers",
              file=sys.stderr)
        return 2
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
        if not args.skip_transformers:
            print("transformers is not installed; pass --skip-transformers to measure moonlet alone", file=sys.stderr)
            return 2
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    results: dict = {
        "device": device.type, "device_name": device_name, "torch": torch.__version__,
        "transformers_version": hf_version, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/gpu_moonlight.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset, "config": config.to_dict(), "dtype": str(dtype).removeprefix("torch."),
        "params": config.param_counts(), "prefill_len": args.prefill_len, "batches": args.batches,
        "prompt_len": args.prompt_len, "decode_steps": args.decode_steps, "warmup": args.warmup,
        "repeats": args.repeats, "check_prompt_len": args.check_prompt_len, "checks": {}, "notes": [],
    }
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    log("copy bandwidth")
    results["bandwidth_bytes_s"] = measure_bandwidth(device)
    results["weights_touched"] = decode_weight_bytes(config, dtype)
    results["floor_ms"] = 1000 * results["weights_touched"]["bytes"] / results["bandwidth_bytes_s"]
    write_json(args.json, results)

    check_ids = torch.tensor(random_ids(1, args.check_prompt_len, config.vocab_size, seed=7000))
    log("moonlet: build")
    model = build_moonlet(config, device, dtype, args.seed)
    with torch.inference_mode():
        moonlet_logits = model(check_ids.to(device)).float().cpu()
    log("moonlet: measure")
    results["moonlet"] = bench_moonlet(model, args, device)
    del model
    free_memory(device)
    write_json(args.json, results)

    if not args.skip_transformers:
        log("transformers: build")
        hf = build_transformers(config, device, dtype, args.seed, args.hf_attn)
        with torch.inference_mode():
            hf_logits = hf(check_ids.to(device)).logits.float().cpu()
        log("transformers: measure")
        results["transformers"] = bench_transformers(hf, args, device)
        del hf
        free_memory(device)
        truth = None
        need = int(1.1 * 4 * config.param_counts()["total"])
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else need
        if dtype != torch.float32 and not args.no_fp32_reference and free < need:
            results["notes"].append(f"logits check: no float32 reference ({free / 2**30:.1f} GiB free, "
                                    f"{need / 2**30:.1f} GiB needed); the fixed bf16 tolerance was used")
            log(results["notes"][-1])
        elif dtype != torch.float32 and not args.no_fp32_reference:
            log("transformers in float32: the logits reference")
            hf = build_transformers(config, device, torch.float32, args.seed, args.hf_attn)
            with torch.inference_mode():
                truth = hf(check_ids.to(device)).logits.float().cpu()
            del hf
            free_memory(device)
        results["checks"]["logits"] = logits_agreement(moonlet_logits, hf_logits, dtype, truth)
        write_json(args.json, results)

    log("greedy check")
    results["checks"]["greedy"] = greedy_check(config, args, device, dtype)
    write_json(args.json, results)
    print(format_report(results))
    return 0 if all(c["ok"] for c in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
