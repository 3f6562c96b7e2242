"""MoBA over the paged latent cache: the engine's masked reference against a per-query brute force
(block means from the token positions themselves); the sparse paths (the engine's default) against
the masked reference and the brute force, also with the blocks they must not read poisoned with NaN;
and engine greedy decoding of a MoBA model against the model's own expanded-path MoBA forward."""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine import moba as engine_moba
from moonlet.engine.moba import (MobaSpec, PageSums, block_means, moba_decode_attention, moba_prefill_attention,
                                 moba_sparse_decode_attention, moba_sparse_prefill_attention, select_blocks)
from moonlet.testing import greedy_reference, random_model, tiny_k2_config

KV_LORA, ROPE, HEADS, PAGE = 12, 4, 3, 4
D = KV_LORA + ROPE


def brute_force(q, tokens, pos, scale, block, top_k):
    """q [h, D] at position pos over tokens [pos+1.., D] (only 0..pos used) -> [h, kv_lora]."""
    keys = tokens[:pos + 1].double()
    own = pos // block
    out = []
    for h in range(q.shape[0]):
        qh = q[h].double()
        scores = {j: float(qh @ keys[j * block:(j + 1) * block].mean(0)) for j in range(own)}
        chosen = sorted(scores, key=scores.get, reverse=True)[:max(top_k - 1, 0)]
        allowed = [t for t in range(pos + 1) if t // block == own or t // block in chosen]
        att = torch.softmax((keys[allowed] @ qh) * scale, dim=0)
        out.append(att @ keys[allowed, :KV_LORA])
    return torch.stack(out).float()


def random_cache(num_pages, seqs_len, seed):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(num_pages, PAGE, D, generator=g)
    perm = torch.randperm(num_pages, generator=g).tolist()
    tables, start = [], 0
    for n in seqs_len:
        pages = -(-n // PAGE)
        tables.append(perm[start:start + pages])
        start += pages
    sums = PageSums([0], num_pages, D, "cpu")
    sums.update(0, pool, torch.arange(num_pages))
    return pool, tables, sums.layer(0), g


@pytest.mark.parametrize("block,top_k", [(8, 2), (8, 3), (4, 1), (12, 10)])
def test_decode_matches_brute_force(block, top_k):
    lens = [1, 7, 8, 9, 30, 41]
    pool, tables, sums, g = random_cache(40, lens, seed=block * 10 + top_k)
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), HEADS, D, generator=g)
    out = moba_decode_attention(q, pool, sums, padded, torch.tensor(lens), 0.3, KV_LORA, block, top_k)
    for s, n in enumerate(lens):
        tokens = pool[tables[s]].reshape(-1, D)
        torch.testing.assert_close(out[s], brute_force(q[s], tokens, n - 1, 0.3, block, top_k), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block,top_k", [(8, 2), (16, 3)])
def test_prefill_chunk_matches_brute_force(block, top_k):
    ctx, T = 45, 19  # the chunk's queries sit at positions 26..44, across several MoBA blocks
    pool, tables, sums, g = random_cache(16, [ctx], seed=block + top_k)
    q = torch.randn(T, HEADS, D, generator=g)
    out = moba_prefill_attention(q, pool, sums, torch.tensor(tables[0]), ctx, 0.25, KV_LORA, block, top_k)
    tokens = pool[tables[0]].reshape(-1, D)
    want = torch.stack([brute_force(q[i], tokens, ctx - T + i, 0.25, block, top_k) for i in range(T)])
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


# ---- the sparse paths ---------------------------------------------------------------------------------

def sums_of(pool):
    sums = PageSums([0], pool.shape[0], D, "cpu")
    sums.update(0, pool, torch.arange(pool.shape[0]))
    return sums.layer(0)


def decode_inputs(lens, num_pages, seed, dtype, extra=2):
    """Random pool in ``dtype``; tables padded past each context (and past the longest by ``extra``) with a
    page no sequence uses (as the engine pads with a page whose values are finite)."""
    pool, tables, _, g = random_cache(num_pages, lens, seed)
    pool = pool.to(dtype)
    width = max(map(len, tables)) + extra
    pad = min(set(range(num_pages)) - {p for t in tables for p in t})
    padded = torch.tensor([t + [pad] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), HEADS, D, generator=g).to(dtype)
    return q, pool, sums_of(pool), tables, padded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block,top_k", [(8, 2), (8, 3), (4, 1), (16, 4), (12, 10), (4, 50)])
def test_sparse_decode_matches_masked_reference(block, top_k, dtype):
    # contexts: shorter than a page, than a block, exact multiples of the block, ragged; one batch
    lens = [1, 3, 7, 8, 9, 16, 30, 41, 48, 97]
    q, pool, sums, tables, padded = decode_inputs(lens, 80, seed=block * 100 + top_k, dtype=dtype)
    ctx = torch.tensor(lens)
    want = moba_decode_attention(q, pool, sums, padded, ctx, 0.3, KV_LORA, block, top_k)
    got = moba_sparse_decode_attention(q, pool, sums, padded, ctx, 0.3, KV_LORA, block, top_k, always_sparse=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # by default it falls back to the masked reference where the heads' union cannot be smaller than the table
    default = moba_sparse_decode_attention(q, pool, sums, padded, ctx, 0.3, KV_LORA, block, top_k)
    torch.testing.assert_close(default, want, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        for s, n in enumerate(lens):
            tokens = pool[tables[s]].reshape(-1, D)
            torch.testing.assert_close(got[s], brute_force(q[s], tokens, n - 1, 0.3, block, top_k), rtol=1e-4,
                                       atol=1e-5)


def test_sparse_decode_does_not_read_unselected_blocks():
    """Pages of earlier blocks that no head picked are set to NaN after the gate sums are taken: the sparse
    path must still match the masked reference on the clean pool (any read of them would give NaN)."""
    lens, block, top_k = [23, 64, 90], 8, 2  # 1 head pick each: at most 3 of up to 11 earlier blocks
    q, pool, sums, tables, padded = decode_inputs(lens, 60, seed=3, dtype=torch.float32)
    ctx = torch.tensor(lens)
    want = moba_decode_attention(q, pool, sums, padded, ctx, 0.3, KV_LORA, block, top_k)
    means = block_means(sums, padded, block // PAGE, block)
    selected = select_blocks(q, means, ctx - 1, block, top_k).any(dim=1)  # [S, nmb]: picked by some head
    poisoned = pool.clone()
    count = 0
    for s, n in enumerate(lens):
        for j in range((n - 1) // block):  # the complete earlier blocks
            if not selected[s, j]:
                poisoned[tables[s][j * 2:j * 2 + 2]] = float("nan")
                count += 1
    assert count >= 8
    got = moba_sparse_decode_attention(q, poisoned, sums, padded, ctx, 0.3, KV_LORA, block, top_k)
    # that batch's table (25 pages) is wider than the heads' union of 3 picks + own block (8 pages): sparse
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block,top_k,ctx,T", [
    (8, 2, 45, 19),  # a chunk across several MoBA blocks, starting mid-block
    (8, 3, 5, 5),  # the whole prompt, shorter than one block
    (8, 3, 64, 64),  # the whole prompt, an exact multiple of the block
    (16, 3, 97, 40),  # ragged end
    (4, 1, 30, 12),  # own block only
    (12, 20, 60, 25),  # top_k above the number of blocks: dense causal (the masked reference is called)
    (8, 3, 45, 40),  # the early queries have fewer earlier blocks than top_k - 1, the late ones more
    (8, 4, 96, 2),  # a short chunk at the start of a block
])
def test_sparse_prefill_matches_masked_reference(block, top_k, ctx, T, dtype):
    pool, tables, _, g = random_cache(40, [ctx], seed=block + top_k + ctx)
    pool = pool.to(dtype)
    sums = sums_of(pool)
    q = torch.randn(T, HEADS, D, generator=g).to(dtype)
    ids = torch.tensor(tables[0])
    want = moba_prefill_attention(q, pool, sums, ids, ctx, 0.25, KV_LORA, block, top_k)
    got = moba_sparse_prefill_attention(q, pool, sums, ids, ctx, 0.25, KV_LORA, block, top_k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        tokens = pool[tables[0]].reshape(-1, D)
        brute = torch.stack([brute_force(q[i], tokens, ctx - T + i, 0.25, block, top_k) for i in range(T)])
        torch.testing.assert_close(got, brute, rtol=1e-4, atol=1e-5)


def test_sparse_prefill_tiles_chunks_and_poisoned_blocks(monkeypatch):
    """Tiny score budget and chunk size force many query tiles and history chunks per block; blocks that
    no (query, head) of the chunk picked are NaN, so reading them would show."""
    block, top_k, ctx, T = 8, 2, 200, 10  # queries in blocks 23 and 24: 30 picks among up to 24 blocks
    pool, tables, _, g = random_cache(60, [ctx], seed=11)
    sums = sums_of(pool)
    q = torch.randn(T, HEADS, D, generator=g)
    ids = torch.tensor(tables[0])
    want = moba_prefill_attention(q, pool, sums, ids, ctx, 0.25, KV_LORA, block, top_k)
    means = block_means(sums, ids[None], block // PAGE, block)
    q_pos = torch.arange(ctx - T, ctx)
    picked = select_blocks(q, means, q_pos, block, top_k).any(dim=(0, 1))
    first_own = (ctx - T) // block
    unread = [j for j in range(first_own) if not picked[j]]
    assert len(unread) >= 3
    poisoned = pool.clone()
    for j in unread:
        poisoned[tables[0][j * 2:j * 2 + 2]] = float("nan")
    monkeypatch.setattr(engine_moba, "_MAX_SCORE_ELEMENTS", 64)
    monkeypatch.setattr(engine_moba, "_CHUNK", 2)
    got = moba_sparse_prefill_attention(q, poisoned, sums, ids, ctx, 0.25, KV_LORA, block, top_k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparse_paths_with_tied_gate_scores():
    """Blocks 1, 2 and 4 hold the same entries, so their gate scores tie exactly; ties go to the lower
    block index, in the brute force (a stable sort) and in both paths."""
    block, top_k, ctx = 8, 3, 48
    pool, tables, _, g = random_cache(40, [ctx], seed=4)
    pages = tables[0]
    for j in (2, 4):
        pool[pages[j * 2:j * 2 + 2]] = pool[pages[2:4]]
    sums = sums_of(pool)
    ids = torch.tensor(pages)
    means = block_means(sums, ids[None], block // PAGE, block)
    assert torch.equal(means[0, 1], means[0, 2]) and torch.equal(means[0, 1], means[0, 4])
    q = torch.randn(20, HEADS, D, generator=g)
    q[:, :, :] += 4 * means[0, 1] / means[0, 1].norm()  # make the tied blocks the best ones
    tokens = pool[pages].reshape(-1, D)
    brute = torch.stack([brute_force(q[i], tokens, ctx - 20 + i, 0.25, block, top_k) for i in range(20)])
    got = moba_sparse_prefill_attention(q, pool, sums, ids, ctx, 0.25, KV_LORA, block, top_k)
    torch.testing.assert_close(got, brute, rtol=1e-4, atol=1e-5)
    sel = select_blocks(q, means, torch.arange(ctx - 20, ctx), block, top_k)
    assert sel[-1, :, 1].all() and sel[-1, :, 2].all() and not sel[-1, :, 4].any()
    decode = moba_sparse_decode_attention(q[-1:], pool, sums, ids[None], torch.tensor([ctx]), 0.25, KV_LORA,
                                          block, top_k, always_sparse=True)
    torch.testing.assert_close(decode[0], brute[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_decode_replays_from_a_cuda_graph():
    """The sparse decode has no host sync: it captures into a CUDA graph, and replays on new inputs."""
    block, top_k, lens = 8, 2, [9, 41, 97]
    q, pool, sums, _, padded = (t.cuda() if isinstance(t, torch.Tensor) else t
                                for t in decode_inputs(lens, 80, seed=7, dtype=torch.bfloat16))
    ctx = torch.tensor(lens, device="cuda")
    static_q = q.clone()
    moba_sparse_decode_attention(static_q, pool, sums, padded, ctx, 0.3, KV_LORA, block, top_k)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moba_sparse_decode_attention(static_q, pool, sums, padded, ctx, 0.3, KV_LORA, block, top_k)
    static_q.copy_(torch.randn_like(q))
    graph.replay()
    want = moba_decode_attention(static_q, pool, sums, padded, ctx, 0.3, KV_LORA, block, top_k)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_block_size_must_be_a_multiple_of_the_page():
    cfg = tiny_k2_config(moba_config={"block_size": 6, "top_k": 2})
    with pytest.raises(ValueError, match=r"block_size=6 is not a multiple .* block_size=4.*--block-size 3"):
        MobaSpec.from_config(cfg, 4)


# ---- the engine end to end -------------------------------------------------------------------------

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def moba_model():
    pytest.importorskip("moonlet.model.sparse")
    # layer 2 stays dense; layers 0 and 1 use MoBA with 8-token blocks, 2 blocks per query
    cfg = tiny_k2_config(moba_config={"block_size": 8, "top_k": 2, "full_attention_layers": [2]})
    return random_model(cfg, seed=5)


@pytest.mark.parametrize("engine_args", [
    dict(num_blocks=80, block_size=4),
    dict(num_blocks=80, block_size=8, max_num_batched_tokens=12),  # chunked prefill across MoBA blocks
    dict(num_blocks=80, block_size=4, max_num_seqs=1, decode_graphs="eager"),
])
def test_engine_greedy_equals_model_moba_forward(moba_model, engine_args):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (37, 5, 26, 3)]
    prompts.append(prompts[0][:30] + [9, 9])  # a prefix-cache hit with MoBA blocks in the shared part
    expected = [greedy_reference(moba_model, p, MAX_TOKENS) for p in prompts]
    llm = LLM(model=moba_model, **engine_args)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected  # again, from the prefix cache
    stats = llm.stats()
    assert stats["blocks_free"] == stats["blocks_total"]


def test_moba_changes_the_engine_output():
    """The MoBA layers really are sparse in the engine: the same weights without moba_config give other
    log-probabilities for the same prompt."""
    moba_model = random_model(tiny_k2_config(moba_config={"block_size": 8, "top_k": 2}), seed=5)
    dense = random_model(tiny_k2_config(), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(moba_model.state_dict().values(), dense.state_dict().values()))
    prompt = torch.randint(2, 320, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=3)
    a = LLM(model=moba_model, num_blocks=40, block_size=4).generate([prompt], params)[0]
    b = LLM(model=dense, num_blocks=40, block_size=4).generate([prompt], params)[0]
    assert a.logprobs[0] != pytest.approx(b.logprobs[0], abs=1e-6)
