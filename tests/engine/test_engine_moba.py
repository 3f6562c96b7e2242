"""MoBA over the paged latent cache: the engine's masked reference against a per-query brute force
(block means from the token positions themselves), and engine greedy decoding of a MoBA model
against the model's own expanded-path MoBA forward."""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.moba import MobaSpec, PageSums, moba_decode_attention, moba_prefill_attention
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
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (37, 5, 26)]
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
