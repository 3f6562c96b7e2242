"""The FP8 latent KV cache (``kv_cache_dtype="fp8"``, ``moonlet.engine.kv_quant``).

References, each independent of the engine:

- the quantizer against rounding to the e4m3 grid built from its bit layout in plain Python;
- the engine's log-probabilities against the model's own full-sequence forward (the expanded path, no
  cache) with every MLA layer's normalized latent and rotated k_pe fake-quantized per token, as an FP8
  pool stores them (forward hooks / a wrapped ``apply_rope``): decode, prefix-cache hits, chunked and
  whole prefill, expanded prefill, the decode-graph buffers, MoBA layers, a hybrid (KDA) model, the host
  tier and tensor parallelism;
- greedy tokens of moonlet-tiny with FP8 against the same engine with the model-dtype cache;
- pool sizing against the bytes per entry computed by hand.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import moonlet.model.attention as mla_module
from moonlet.engine import LLM, SamplingParams
from moonlet.engine.cache import LatentCachePool, bytes_per_block
from moonlet.engine.config import EngineConfig, resolve
from moonlet.engine.kv_quant import dequantize_entries, quantize_entries, resolve_kv_cache_dtype
from moonlet.model.attention import MLAttention
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_kimi_linear_config


# ---- the quantizer -------------------------------------------------------------------------------------

def e4m3_grid() -> torch.Tensor:
    """Every finite float8_e4m3fn value, from the format (1 sign, 4 exponent bits with bias 7, 3 mantissa
    bits, subnormals at exponent 0, no infinities, S.1111.111 = NaN), computed in plain Python."""
    values = set()
    for exponent in range(16):
        for mantissa in range(8):
            if exponent == 15 and mantissa == 7:
                continue  # NaN
            if exponent == 0:
                v = mantissa / 8 * 2.0 ** -6
            else:
                v = (1 + mantissa / 8) * 2.0 ** (exponent - 7)
            values.update((v, -v))
    return torch.tensor(sorted(values), dtype=torch.float64)


def assert_rounded_to_nearest(got: torch.Tensor, y: torch.Tensor, grid: torch.Tensor) -> None:
    """``got`` is the grid value nearest ``y``; where ``y`` sits halfway between two grid values (to within
    the float32 rounding of the quantizer's division: bf16 inputs make exact halves common) either one."""
    dist = (y.double()[..., None] - grid).abs()
    two = dist.topk(2, dim=-1, largest=False)
    nearest, second = grid[two.indices[..., 0]], grid[two.indices[..., 1]]
    tie = (two.values[..., 1] - two.values[..., 0]) <= 1e-6 * y.double().abs().clamp(min=1.0)
    ok = (got.double() == nearest) | (tie & (got.double() == second))
    assert ok.all(), (got[~ok], y[~ok])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_nearest_e4m3_value_times_each_parts_scale(dtype):
    g = torch.Generator().manual_seed(0)
    kv_lora, rope = 32, 16
    # latents near 1, k_pe 50x larger, magnitudes spread over 2^-12 .. 2^4 per row (subnormals included)
    x = torch.randn(64, kv_lora + rope, generator=g) * 2.0 ** torch.randint(-12, 5, (64, 1), generator=g)
    x[:, kv_lora:] *= 50
    x[3] = 0.0  # an all-zero entry
    x[5, kv_lora:] = 0.0  # a zero k_pe part
    x = x.to(dtype)
    q, scales = quantize_entries(x, kv_lora)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (64, 2) and scales.dtype == torch.float32
    xf = x.double()
    grid = e4m3_grid()
    for part, cols in ((0, slice(0, kv_lora)), (1, slice(kv_lora, None))):
        amax = xf[:, cols].abs().amax(dim=-1)
        expect_scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
        torch.testing.assert_close(scales[:, part].double(), expect_scale, rtol=1e-6, atol=0)
        y = xf[:, cols] / scales[:, part:part + 1].double()
        # the stored byte is the e4m3 value nearest x / scale
        assert_rounded_to_nearest(q[:, cols], y, grid)
        # and the per-element bound: half a step of 3 mantissa bits, or half the subnormal step 2^-9
        back = dequantize_entries(q, scales, kv_lora)[:, cols].double()
        bound = torch.maximum(y.abs() * 2.0 ** -4, torch.full_like(y, 2.0 ** -10)) * scales[:, part:part + 1]
        assert ((back - xf[:, cols]).abs() <= bound * (1 + 1e-6)).all()
        assert back[:, :].abs().amax(dim=-1).sub(amax).abs().max() <= 1e-6 * amax.max()  # the max is exact
    assert (dequantize_entries(q, scales, kv_lora)[3] == 0).all() and (scales[3] == 1).all()


def test_pool_write_and_read_through_uint8_views():
    pool = LatentCachePool(2, 5, 4, 12, dtype=torch.float8_e4m3fn, kv_lora=8)
    assert pool.scales.shape == (2, 5, 4, 2) and pool.nbytes == 2 * 5 * 4 * (12 + 8)
    entries = torch.randn(3, 12)
    slots = torch.tensor([0, 7, 19])
    pool.write(1, slots, entries)
    q, s = quantize_entries(entries, 8)
    flat, flat_scales = pool.layer(1).view(-1, 12), pool.layer_scales(1).view(-1, 2)
    assert torch.equal(flat[slots].view(torch.uint8), q.view(torch.uint8)) and torch.equal(flat_scales[slots], s)
    assert (pool.layer(0).float() == 0).all()  # the other layer is untouched
    with pytest.raises(ValueError, match="needs kv_lora"):
        LatentCachePool(1, 2, 4, 12, dtype=torch.float8_e4m3fn)


def test_bad_kv_cache_dtype_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8' must be one of 'auto', 'fp8'"):
        resolve_kv_cache_dtype("int8", torch.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp16'"):
        EngineConfig(kv_cache_dtype="fp16").validate()
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype(None, torch.float32) == torch.float32
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="lacks; upgrade torch"):
        resolve_kv_cache_dtype("fp8", torch.bfloat16)


# ---- the reference: the model's own forward with fake-quantized latents ----------------------------------

def fake_fp8(x: torch.Tensor) -> torch.Tensor:
    """What an FP8 pool gives back for one part of a cache entry: one scale per token (last dim) = amax / 448,
    round to e4m3, multiply back. Written here on its own (the engine's is ``kv_quant.quantize_entries``)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    return ((xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


@contextlib.contextmanager
def fp8_latents(model):
    """Run ``model``'s own forward with its cached values fake-quantized: the normalized latent (a hook on
    each MLA layer's kv_a_layernorm) and the k_pe after rotation (``apply_rope`` wrapped: k_pe is its only
    3-D input, q_pe is [B, T, h, r]); NoPE layers' k_pe comes straight out of kv_a_proj_with_mqa."""
    handles = []
    for layer in model.model.layers:
        attn = layer.self_attn
        if not isinstance(attn, MLAttention):
            continue
        handles.append(attn.kv_a_layernorm.register_forward_hook(lambda mod, args, out: fake_fp8(out)))
        if not attn.use_rope:
            r = attn.qk_rope_head_dim
            handles.append(attn.kv_a_proj_with_mqa.register_forward_hook(
                lambda mod, args, out, r=r: torch.cat([out[..., :-r], fake_fp8(out[..., -r:])], dim=-1)))
    rope = mla_module.apply_rope

    def rope_then_quantize(x, cos, sin):
        out = rope(x, cos, sin)
        return fake_fp8(out) if out.dim() == 3 else out

    mla_module.apply_rope = rope_then_quantize
    try:
        yield model
    finally:
        mla_module.apply_rope = rope
        for h in handles:
            h.remove()


def reference_logprobs(model, prompt, tokens) -> list[torch.Tensor]:
    """Log-softmax of the fake-quantized full forward at each generated position."""
    with fp8_latents(model), torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens)]))[0].float()
    return [logits[len(prompt) - 1 + i].log_softmax(-1) for i in range(len(tokens))]


def assert_matches_reference(model, prompts, outs, atol=2e-4):
    for prompt, out in zip(prompts, outs):
        ref = reference_logprobs(model, prompt, out.token_ids)
        for step, (token, lp, r) in enumerate(zip(out.token_ids, out.logprobs, ref)):
            assert token == int(r.argmax()), (prompt, step)  # greedy: the reference's own pick
            for t, value in lp.items():
                assert value == pytest.approx(float(r[t]), abs=atol), (prompt, step, t)


MAX_TOKENS = 8
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    base = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (5, 19, 40, 2, 33)]
    shared = base[2][:35]
    return base + [shared + [7, 8, 9], shared + [11], base[1][:16]]


ENGINES = {
    "batched": dict(num_blocks=64),
    "chunked_prefill": dict(num_blocks=64, max_num_batched_tokens=8),
    "whole_prefill_one_at_a_time": dict(num_blocks=64, enable_chunked_prefill=False, max_num_seqs=1),
    "expanded_prefill": dict(num_blocks=64, max_num_batched_tokens=12, prefill_attention="expanded"),
    "decode_graphs_eager": dict(num_blocks=64, decode_graphs="eager", decode_graph_batch_sizes=(1, 2, 4)),
    "tiny_pool_preempts": dict(num_blocks=14, block_size=4, max_num_batched_tokens=24),
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_logprobs_equal_the_fake_quantized_forward(model, prompts, name):
    llm = LLM(model=model, kv_cache_dtype="fp8", **ENGINES[name])
    assert llm.engine.pool.dtype == torch.float8_e4m3fn
    outs = llm.generate(prompts, PARAMS)
    assert_matches_reference(model, prompts, outs)
    again = llm.generate(prompts, PARAMS)  # now from the prefix cache: the stored entries are read back
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert_matches_reference(model, prompts, again)
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["blocks_free"] == stats["blocks_total"]
    assert stats["kv_cache_dtype"] == "float8_e4m3fn"


def test_the_reference_can_tell_fp8_from_the_model_dtype(model, prompts):
    # the fake-quantized forward differs from the plain one by more than the tolerance used above, so the
    # comparisons above do check that the engine quantizes (and the auto cache does not)
    outs = LLM(model=model, num_blocks=64).generate(prompts[:3], PARAMS)
    with pytest.raises(AssertionError):
        assert_matches_reference(model, prompts[:3], outs)


def test_moba_layers_with_an_fp8_cache():
    # MoBA gates use per-page sums of the stored (dequantized) entries; the model's MoBA forward with the same
    # fake quantization picks the same blocks
    moba = random_model(tiny_k2_config(moba_config={"block_size": 8, "top_k": 2, "full_attention_layers": [2]}),
                        seed=5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (37, 5, 26)]
    prompts.append(prompts[0][:30] + [9, 9])
    llm = LLM(model=moba, kv_cache_dtype="fp8", num_blocks=80, block_size=8, max_num_batched_tokens=12)
    outs = llm.generate(prompts, PARAMS)
    assert_matches_reference(moba, prompts, outs)
    sums = llm.engine.runner.kv.page_sums
    pool = llm.engine.pool
    for layer in sums.index:  # the sums are those of the dequantized entries
        full = dequantize_entries(pool.layer(layer), pool.layer_scales(layer), pool.kv_lora).sum(dim=1)
        written = sums.layer(layer).abs().sum(dim=-1) > 0
        torch.testing.assert_close(sums.layer(layer)[written], full[written])


def test_hybrid_model_keeps_its_mla_latents_in_fp8():
    from moonlet.model.transformer import Transformer

    cfg = tiny_kimi_linear_config(vocab_size=96, max_position_embeddings=512, linear_attn_config=dict(
        kda_layers=[1, 2, 4], full_attn_layers=[3], num_heads=2, head_dim=8, short_conv_kernel_size=4))
    hybrid = Transformer(cfg).init_weights(seed=4).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (5, 40, 23)]
    prompts.append(prompts[1][:32] + [7, 7])
    llm = LLM(model=hybrid, kv_cache_dtype="fp8", num_blocks=64, max_num_batched_tokens=7)
    assert llm.engine.pool.layer_ids == [2] and llm.engine.pool.dtype == torch.float8_e4m3fn
    assert llm.engine.runner.states.states[1][-1].dtype == torch.float32  # the KDA state is unchanged
    outs = llm.generate(prompts, PARAMS)
    with fp8_latents(hybrid):
        expected = [greedy_reference(hybrid, p, MAX_TOKENS) for p in prompts]
    assert [o.token_ids for o in outs] == expected
    assert_matches_reference(hybrid, prompts, outs)


def test_host_tier_copies_the_scales(model):
    # a pool of 6 blocks: the second prompt evicts every cached block of the first to the host tier, the third
    # starts like the first and hits them there
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(2, 320, (20,), generator=g).tolist()
    prompts = [shared + [5], torch.randint(2, 320, (38,), generator=g).tolist(), shared + [6, 7]]
    llm = LLM(model=model, kv_cache_dtype="fp8", num_blocks=6, block_size=8, max_num_seqs=1,
              host_cache_memory=2 ** 20)
    host = llm.engine.runner.host
    assert host.scales is not None and host.data.dtype == torch.float8_e4m3fn
    outs = [llm.generate([p], PARAMS)[0] for p in prompts]
    stats = llm.stats()
    assert stats["host_cache_hits"] > 0
    assert_matches_reference(model, prompts, outs)


# ---- moonlet-tiny: FP8 against the model-dtype cache ------------------------------------------------------

TINY_PROMPTS = ["def add(a, b):\n    return", "The capital of France is", "import os\nimport sys\n\ndef main():",
                "class Foo:\n    def __init__(self", "What is 12 + 30?", "for i in range(10):\n    print(",
                "Hello, who are you?", "def read_file(path):\n    with open("]


def test_moonlet_tiny_greedy_tokens_mostly_agree_with_the_model_dtype_cache():
    """Greedy decoding can only part ways where the FP8 cache's small perturbation of the scores flips the
    model-dtype run's top choice, i.e. where that run was close to a tie: at each first divergence the FP8
    pick must be the float32 run's runner-up (in its top 2), and that run's margin there must be smaller than
    at the typical agreeing step (below the lower quartile of its margins). Before it, the distributions differ
    only by the cache error."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    runs = {}
    for kv in ("auto", "fp8"):
        with LLM(None, dtype="float32", kv_cache_dtype=kv) as llm:
            runs[kv] = llm.generate(TINY_PROMPTS, params)
    margins, divergences, deviations = [], [], []
    for a, b in zip(runs["auto"], runs["fp8"]):
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        for i in range(len(a.token_ids) if first is None else first + 1):
            top = sorted(a.logprobs[i].values(), reverse=True)
            if i == first:
                assert b.token_ids[i] in a.logprobs[i], "the FP8 pick is not the float32 run's runner-up"
                divergences.append(top[0] - a.logprobs[i][b.token_ids[i]])
            else:
                margins.append(top[0] - top[1])
            deviations.append(abs(a.logprobs[i][a.token_ids[i]] - b.logprobs[i].get(a.token_ids[i], float("nan"))))
    quartile = torch.tensor(margins).quantile(0.25).item()
    assert all(d < quartile for d in divergences), (divergences, quartile)
    agreeing = sum(len(a.token_ids) if a.token_ids == b.token_ids else
                   next(i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y)
                   for a, b in zip(runs["auto"], runs["fp8"]))
    assert agreeing >= 0.5 * sum(len(a.token_ids) for a in runs["auto"])


# ---- sizing ------------------------------------------------------------------------------------------------

def test_the_same_memory_holds_about_twice_the_blocks():
    from moonlet.config import ModelConfig

    k2 = ModelConfig.from_dict(dict(tiny_k2_config().to_dict(), num_hidden_layers=61, kv_lora_rank=512,
                                    qk_rope_head_dim=64, max_position_embeddings=131072))
    bf16 = bytes_per_block(k2, 64, torch.bfloat16)
    fp8 = bytes_per_block(k2, 64, torch.float8_e4m3fn)
    assert bf16 == 61 * 64 * 576 * 2 and fp8 == 61 * 64 * (576 + 2 * 4)  # entries, and two fp32 scales each
    cfg = dict(kv_cache_memory="1GiB", max_num_seqs=64, block_size=64)
    auto = resolve(EngineConfig(**cfg), k2, torch.device("cpu"), torch.bfloat16)
    quant = resolve(EngineConfig(kv_cache_dtype="fp8", **cfg), k2, torch.device("cpu"), torch.bfloat16)
    assert auto.num_blocks == 2 ** 30 // bf16 and quant.num_blocks == 2 ** 30 // fp8
    assert quant.num_blocks / auto.num_blocks == pytest.approx(1152 / 584, rel=0.05)
    assert quant.kv_cache_dtype == torch.float8_e4m3fn and auto.kv_cache_dtype == torch.bfloat16


def test_engine_pool_bytes_and_max_model_len_follow_the_dtype(model):
    auto = LLM(model=model, kv_cache_memory="256KiB", block_size=4, max_num_seqs=4)
    quant = LLM(model=model, kv_cache_memory="256KiB", block_size=4, max_num_seqs=4, kv_cache_dtype="fp8")
    for llm in (auto, quant):
        s = llm.stats()
        assert s["kv_cache_bytes"] <= 256 * 1024 and s["kv_cache_bytes"] == llm.engine.pool.nbytes
    # float32 model: 4-byte entries against 1-byte entries plus 8 bytes of scales (48 values per entry)
    ratio = quant.stats()["blocks_total"] / auto.stats()["blocks_total"]
    assert ratio == pytest.approx(48 * 4 / (48 + 8), rel=0.05)
    assert quant.engine.max_model_len > auto.engine.max_model_len


def test_cli_flag():
    import argparse

    from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    assert engine_args_from_cli(parser.parse_args(["--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"
    assert "kv_cache_dtype" not in engine_args_from_cli(parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])
