"""Tensor / expert parallelism (moonlet.parallel, moonlet.engine.parallel) on the CPU over gloo.

The reference is the same checkpoint run whole in one process: the sharded model's logits must equal
the full model's, and a tensor-parallel engine must give the same greedy tokens (and nearly the same
log-probabilities) as a single-process engine, through prefix-cache hits, chunked prefill, speculative
drafts and the decode-graph path."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.parallel import WorkerError
from moonlet.model import Transformer
from moonlet.parallel import TensorParallel, shard_transformer
from moonlet.testing import random_model, tiny_k2_config, tiny_kimi_linear_config, tiny_v2_lite_config
from moonlet.weights import load_model, save_model

CONFIGS = {
    "k2": lambda: tiny_k2_config(),
    # two shared experts: with 2 ranks each one's share of them is one routed expert's size
    "v2-lite": lambda: tiny_v2_lite_config(),
    # a vocabulary 2 does not divide (uneven last range) and a tied head
    "k2-odd-vocab-tied": lambda: tiny_k2_config(vocab_size=301, tie_word_embeddings=True),
    # Kimi Linear: KDA heads split too (projections, convolutions, gates, decay parameters)
    "kimi-linear": lambda: tiny_kimi_linear_config(),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_logits(rank: int, world: int, port: int, path: str, ids: torch.Tensor, out: dict) -> None:
    torch.set_num_threads(1)
    tp = TensorParallel.connect(rank, world, "127.0.0.1", port, torch.device("cpu"), timeout_s=120)
    model = load_model(path, dtype=torch.float32, tensor_parallel=tp)
    with torch.no_grad():
        logits = model(ids)
    experts = {name.split(".mlp.experts.")[1].split(".")[0] for name in model.state_dict() if ".mlp.experts." in name}
    out[rank] = (logits, len(experts))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_model_matches_the_whole_model(tmp_path, name):
    config = CONFIGS[name]()
    save_model(random_model(config, seed=5), tmp_path)
    whole = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = whole(ids)
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(_sharded_logits, args=(2, _port(), str(tmp_path), ids, out), nprocs=2, join=True)
    for rank in range(2):
        logits, num_experts = out[rank]
        assert logits.shape == expect.shape
        torch.testing.assert_close(logits, expect, atol=2e-5, rtol=1e-4)
        assert num_experts == config.n_routed_experts // 2  # each rank holds (and read) half of them


class _FakeGroup:
    pass


@pytest.mark.parametrize("world, field, factory", [
    (3, "num_attention_heads", tiny_k2_config),
    (16, "n_routed_experts", lambda: tiny_k2_config(num_attention_heads=16)),
])
def test_sharding_refuses_uneven_splits(world, field, factory):
    with torch.device("meta"):
        model = Transformer(factory())
    with pytest.raises(ValueError, match=f"{field}.*not divisible by tensor_parallel_size {world}"):
        shard_transformer(model, TensorParallel(0, world, _FakeGroup()))


def test_sharding_refuses_uneven_kda_heads():
    with torch.device("meta"):
        model = Transformer(tiny_kimi_linear_config(num_attention_heads=4))
    with pytest.raises(ValueError, match="linear_attn_config num_heads \\(2\\) is not divisible by "
                                         "tensor_parallel_size 4"):
        shard_transformer(model, TensorParallel(0, 4, _FakeGroup()))


@pytest.mark.slow
@pytest.mark.parametrize("spec", [{}, {"speculative": "ngram", "ngram_min": 1}], ids=["plain", "ngram"])
def test_hybrid_model_under_tensor_parallelism(tmp_path, spec):
    """Kimi Linear: each rank keeps its heads' KDA state; prefix hits resume from state snapshots on every
    rank; with speculative decoding every rank puts back the state after the accepted drafts. Same
    tokens as one process."""
    save_model(random_model(tiny_kimi_linear_config(), seed=2), tmp_path)
    params = SamplingParams(max_tokens=8 if not spec else 24, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(3, 40)) + [5, 6, 7], [9, 8, 7, 6, 5, 4] * 3]
    runs = []
    for world in (1, 2):
        with LLM(str(tmp_path), dtype="float32", block_size=4, num_blocks=64, max_num_batched_tokens=16,
                 tensor_parallel_size=world, **spec) as llm:
            out = llm.generate(prompts[:1], params) + llm.generate(prompts[1:], params)
            runs.append([o.token_ids for o in out])
            assert llm.stats()["state_snapshots_restored"] > 0
            if spec:
                assert llm.stats()["spec_draft_tokens"] > llm.stats()["spec_accepted_tokens"] > 0
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-k2")
    save_model(random_model(tiny_k2_config(), seed=3), path)
    return path


PROMPTS = [[5, 9, 33, 7, 2, 11], [5, 9, 33, 7, 2, 11, 40, 41], list(range(20, 90)), [7, 8, 7, 8, 7, 8, 7, 8, 7]]


def _run(path, **engine_args):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    with LLM(str(path), dtype="float32", block_size=4, num_blocks=96, max_num_batched_tokens=32,
             **engine_args) as llm:
        first = llm.generate(PROMPTS[:1], params)  # then the second prompt extends a cached prefix
        rest = llm.generate(PROMPTS[1:], params)
        return first + rest, llm.stats()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"speculative": "ngram", "num_speculative_tokens": 3},
                                   {"speculative": "draft", "num_speculative_tokens": 3},
                                   {"decode_graphs": "eager", "decode_graph_batch_sizes": (1, 2, 4)},
                                   {"kv_cache_dtype": "fp8"}],  # every rank quantizes its own pool alike
                         ids=["plain", "ngram", "draft", "graphs", "fp8"])
def test_engine_tokens_match_a_single_process(checkpoint, extra):
    if extra.get("speculative") == "draft":  # the whole checkpoint drafts for itself, on rank 0 only
        extra = {**extra, "speculative_model": str(checkpoint)}
    expect, _ = _run(checkpoint, **extra)
    got, stats = _run(checkpoint, tensor_parallel_size=2, **extra)
    assert stats["prefix_cache_hits"] > 0  # the cached prefix was served on both ranks' pools
    if "speculative_model" in extra:
        assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    for a, b in zip(expect, got):
        assert b.token_ids == a.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys()
            for token in la:
                assert lb[token] == pytest.approx(la[token], abs=1e-4)


@pytest.mark.slow
def test_moba_layers_under_tensor_parallelism(tmp_path):
    """MoBA picks blocks per head from the cache's page sums: with the heads split, each rank picks for
    its own heads, which must give the single-process tokens."""
    save_model(random_model(tiny_k2_config(moba_config={"block_size": 8, "top_k": 2}), seed=7), tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [list(range(30, 100)), list(range(200, 241))]
    runs = []
    for world in (1, 2):
        with LLM(str(tmp_path), dtype="float32", block_size=8, num_blocks=64, max_num_batched_tokens=24,
                 tensor_parallel_size=world) as llm:
            runs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_engine_on_two_gpus_matches_one(checkpoint):
    """NCCL, decode graphs captured on both ranks, the Triton decode kernel: float32 greedy tokens equal
    the single-GPU engine's."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    runs = []
    for world in (1, 2):
        with LLM(str(checkpoint), device="cuda", dtype="float32", num_blocks=64, max_num_seqs=8,
                 tensor_parallel_size=world) as llm:
            runs.append([o.token_ids for o in llm.generate(PROMPTS, params)])
            if world == 2:
                assert llm.engine.runner.graph_steps > 0
    assert runs[0] == runs[1]


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_checkpoint_kept_under_tensor_parallelism(tmp_path, quantization):
    """Each rank keeps its routed experts (their grouped path skips the other ranks' slots) and the
    replicated linears as stored, and dequantizes its slices of the split matrices: the tokens of one
    process keeping everything."""
    from moonlet.model.quantized import quantized_modules

    save_model(random_model(tiny_k2_config(), seed=4), tmp_path, dtype=torch.bfloat16, quantization=quantization)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 30)), [7, 8, 9], list(range(100, 112))]
    runs = []
    for world in (1, 2):
        with LLM(str(tmp_path), quantization="keep", dtype="float32", block_size=4, num_blocks=64,
                 tensor_parallel_size=world) as llm:
            kept = quantized_modules(llm.engine.model)
            assert kept  # the routed experts at least
            if world == 2:  # split matrices are dequantized slices; whole experts and replicated linears stay stored
                assert all(".mlp.experts." in name or name.endswith(("q_a_proj", "kv_a_proj_with_mqa"))
                           for name, _ in kept)
            runs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]


def test_fused_moe_slot_layout_skips_other_ranks_slots():
    from moonlet.kernels.quant_moe import align_slots

    groups, block_m = 3, 4
    indices = torch.tensor([[0, 3], [2, 3], [3, 0], [1, 2], [3, 3]])  # 3 = another rank's expert
    rows, block_groups = align_slots(indices, groups, block_m)
    flat = indices.reshape(-1)
    real = rows[rows < flat.numel()].tolist()
    assert sorted(real) == [i for i in range(flat.numel()) if flat[i] < groups]  # each local slot once
    for tile, group in enumerate(block_groups.tolist()):
        tile_rows = [r for r in rows[tile * block_m:(tile + 1) * block_m].tolist() if r < flat.numel()]
        assert all(flat[r] == group for r in tile_rows)


@pytest.mark.slow
def test_host_cache_tier_under_tensor_parallelism(checkpoint):
    """Swap-outs and swap-ins travel with the step: every rank copies its own pool's blocks to and from
    its own host tier, and a host hit gives the single-process tokens."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    sessions = [list(range(10 + 50 * i, 50 + 50 * i)) for i in range(3)]  # 40 tokens: 10 blocks each
    runs = []
    for world in (1, 2):
        with LLM(str(checkpoint), dtype="float32", block_size=4, num_blocks=24, host_cache_memory="256KiB",
                 tensor_parallel_size=world) as llm:
            out = [llm.generate([s], params)[0].token_ids for s in sessions]  # the first one is evicted
            again = llm.generate([sessions[0] + out[0] + [7, 7, 7]], params)[0]
            assert llm.stats()["host_cache_hits"] > 0 and again.num_cached_tokens >= 40
            runs.append(out + [again.token_ids])
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_a_dead_worker_is_a_clear_error(checkpoint):
    llm = LLM(str(checkpoint), dtype="float32", block_size=4, num_blocks=32, tensor_parallel_size=2)
    try:
        proc = llm.engine.workers.procs[0]
        proc.kill()
        proc.join(10)
        with pytest.raises(WorkerError, match="rank 1"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    finally:
        llm.close()
    assert not proc.is_alive()


def test_tensor_parallel_needs_a_checkpoint_path_and_a_valid_size(checkpoint):
    with pytest.raises(ValueError, match="pass model_path"):
        LLM(model=random_model(tiny_k2_config()), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        LLM(str(checkpoint), tensor_parallel_size=0)


@pytest.mark.slow
def test_an_unsplittable_model_stops_the_workers(checkpoint):
    import multiprocessing

    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) is not divisible by tensor_parallel_size 3"):
        LLM(str(checkpoint), dtype="float32", num_blocks=16, tensor_parallel_size=3)
    left = [p for p in multiprocessing.active_children() if p not in before]
    assert not left


@pytest.mark.slow
def test_image_requests_under_tensor_parallelism(tmp_path):
    """The vision tower runs on rank 0 only; the workers get the image feature rows with the step."""
    import io

    import numpy as np
    from PIL import Image

    from moonlet.config import ModelConfig
    from moonlet.model.vision import VisionLanguageModel
    from moonlet.testing import TINY_VISION_CONFIG, tiny_image_processor

    pad = 300
    outer = {"model_type": "kimi_k25", "media_placeholder_token_id": pad, "text_config": tiny_k2_config().to_dict(),
             "vision_config": TINY_VISION_CONFIG}
    cfg = ModelConfig.from_dict(outer)
    vlm = VisionLanguageModel(cfg, random_model(cfg, seed=1)).init_vision_weights(11, std=0.05).eval()
    save_model(vlm, tmp_path, dtype=torch.float32)
    images = []
    for seed in (1, 2):
        buf = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="PNG")
        images.append(buf.getvalue())
    requests = [{"prompt": [5, 7, pad, 9, 11], "images": images[:1]},
                {"prompt": [5, pad, 8, pad, 6], "images": images}, [4, 5, 6, 7]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    runs = []
    for world in (1, 2):
        with LLM(str(tmp_path), image_processor=tiny_image_processor(), dtype="float32", block_size=4,
                 num_blocks=64, max_num_batched_tokens=8, tensor_parallel_size=world) as llm:
            runs.append([o.token_ids for o in llm.generate(requests, params)])
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_mtp_drafts_under_tensor_parallelism(tmp_path):
    """DeepSeek-V3's MTP layer runs whole on rank 0 over rank 0's (replicated) hidden states; the
    tokens equal a single process's."""
    from moonlet.model.mtp import MTPHead
    from moonlet.weights import save_mtp

    model = random_model(tiny_k2_config(num_nextn_predict_layers=1), seed=3)
    save_model(model, tmp_path)
    save_mtp(MTPHead(model.config).init_weights(seed=5), model, tmp_path)
    expect, _ = _run(tmp_path, speculative="mtp", num_speculative_tokens=2)
    got, stats = _run(tmp_path, tensor_parallel_size=2, speculative="mtp", num_speculative_tokens=2)
    assert stats["spec_draft_tokens"] > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in expect]
