"""The host-memory tier of the prefix cache (``host_cache_memory``).

End to end with a tiny model and a device pool too small for the workload: sessions whose earlier
prefix was evicted get it back from the host tier (exactly the hits a pool that never evicts gives),
compute fewer prompt tokens, and produce the same greedy tokens as the model's own greedy loop, a run
without the tier and a run with a large pool. Storage: blocks come back bit-identical (latent rows and
MoBA page sums). Bookkeeping: the host LRU against a brute-force LRU; the same-step hazards (a block
evicted and reused in one step, a host block read and evicted in one step, a swap-in called off when
admission fails); preemption and aborts in a random workload against a reference run.
"""

import random

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.cache import KVCacheManager, LatentCachePool
from moonlet.engine.config import EngineConfig, add_engine_cli_args, engine_args_from_cli, resolve
from moonlet.engine.host_cache import HostBlockIndex, HostCachePool
from moonlet.engine.sequence import Sequence
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_kimi_linear_config

BS = 4
LAYERS, LATENT = 3, 48  # tiny_k2_config: 3 layers, kv_lora 32 + rope 16
HOST_BLOCK = LAYERS * BS * LATENT * 4  # bytes per host block in float32


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=11)


def session_starts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 320, (n, length), generator=g).tolist()


def run_sessions(llm: LLM, starts: list[list[int]], turns: int, max_tokens: int = 5):
    """Agent-like: sessions one after another, each turn resending its whole history plus a new user
    message; turn t of every session before turn t + 1 of any (so by its next turn, a session's prefix
    has been pushed out of a small device pool by the others). Returns per request (prompt, tokens,
    num_cached_tokens) in submission order."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    convs = [list(s) for s in starts]
    rng = random.Random(0)
    records = []
    for turn in range(turns):
        for i, conv in enumerate(convs):
            out = llm.generate([conv], params)[0]
            records.append((list(conv), out.token_ids, out.num_cached_tokens))
            convs[i] = conv + out.token_ids + [rng.randrange(2, 320) for _ in range(6)]
    return records


def test_multi_turn_sessions_hit_the_host_tier_and_match_references(model):
    starts = session_starts(4, 22, seed=1)
    small = dict(block_size=BS, num_blocks=14, max_num_batched_tokens=32)
    with_tier = LLM(model=model, **small, host_cache_memory=64 * HOST_BLOCK)
    without = LLM(model=model, **small)
    large = LLM(model=model, block_size=BS, num_blocks=400, max_num_batched_tokens=32)
    got = run_sessions(with_tier, starts, turns=3)
    ref_small = run_sessions(without, starts, turns=3)
    ref_large = run_sessions(large, starts, turns=3)
    # the same greedy tokens as both independent runs and as the model's own greedy loop
    assert [r[1] for r in got] == [r[1] for r in ref_small] == [r[1] for r in ref_large]
    for prompt, tokens, _ in got[::3]:
        assert tokens == greedy_reference(model, prompt, len(tokens))
    # the tier gives exactly the hits of a pool that never evicts; the small pool alone far fewer
    assert [r[2] for r in got] == [r[2] for r in ref_large]
    computed = {name: sum(len(p) - c for p, _, c in recs)
                for name, recs in (("tier", got), ("small", ref_small), ("large", ref_large))}
    assert computed["tier"] == computed["large"] < computed["small"]
    stats = with_tier.stats()
    assert stats["host_cache_hits"] > 0 and stats["host_cache_blocks_swapped_in"] > 0
    assert stats["host_cache_blocks_swapped_out"] > 0
    assert stats["host_cache_hits"] == BS * stats["host_cache_blocks_swapped_in"]
    assert stats["host_cache_bytes_swapped_in"] == HOST_BLOCK * stats["host_cache_blocks_swapped_in"]
    assert stats["prefix_cache_hits"] == sum(r[2] for r in got)
    assert stats["blocks_free"] == stats["blocks_total"]
    assert without.stats()["host_cache_hits"] == 0


def test_host_lru_against_brute_force():
    rng = random.Random(3)
    index = HostBlockIndex(5)
    lru: list[bytes] = []  # brute force: least recently used first
    where: dict[bytes, int] = {}
    for step in range(400):
        digest = bytes([rng.randrange(12)])
        if rng.random() < 0.5:
            got = index.get(digest)
            assert (got is not None) == (digest in lru)
            if digest in lru:
                assert got == where[digest]
                lru.remove(digest)
                lru.append(digest)
        elif digest not in lru:
            block = index.store(digest)
            if len(lru) == 5:
                victim = lru.pop(0)
                assert block == where.pop(victim)  # the least recently used block is reused
            lru.append(digest)
            where[digest] = block
        assert list(index.block_of) == lru
    assert index.num_evicted > 0


def test_host_lru_skips_pinned_blocks():
    index = HostBlockIndex(2)
    a, b = index.store(b"a"), index.store(b"b")
    index.pin(a)  # a swap-in of this step reads a: the LRU victim is b instead
    assert index.store(b"c") == b and b"b" not in index and index.get(b"a") == a
    index.pin(b)
    assert index.store(b"d") is None  # every block is read this step: nothing is overwritten
    index.unpin_all()
    assert index.store(b"d") == b and b"c" not in index  # c is now the least recently used (a was read)


def test_engine_host_tier_evicts_least_recently_used(model):
    """A tier of 6 blocks behind a pool of 12, four 5-block prompts one after another: the tier ends up
    holding exactly the 6 blocks evicted last (recorded as the device evicts them), least recently
    used first. The first prompt again then hits the two of its blocks still there, from the host, and
    its chain stops at the first block the tier dropped."""
    llm = LLM(model=model, block_size=BS, num_blocks=12, host_cache_memory=6 * HOST_BLOCK + 100)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompts = session_starts(4, 21, seed=4)  # 5 full blocks each
    cache = llm.engine.cache
    evicted: list[bytes] = []
    on_evict = cache.allocator.on_evict
    cache.allocator.on_evict = lambda block, digest: (evicted.append(digest), on_evict(block, digest))
    for prompt in prompts:
        llm.generate([prompt], params)
    assert len(set(evicted)) == len(evicted) > 6 and cache.host.num_evicted == len(evicted) - 6
    assert list(cache.host.block_of) == evicted[-6:]
    first = cache._hashes(Sequence("a", prompts[0], params, frozenset()), 5)
    kept = [h in cache.host for h in first]
    assert kept == [True, True, False, False, False]  # evicted last-block-first, so its head stayed longest
    before = llm.stats()["host_cache_hits"]
    out = llm.generate([prompts[0] + [5, 6]], params)[0]
    assert out.num_cached_tokens == 2 * BS and llm.stats()["host_cache_hits"] - before == 2 * BS


def test_blocks_restored_bit_identical(model):
    """Rows of a session's blocks read from the device pool before eviction equal the host copies and,
    after the next turn's swap-in, the rows of the device blocks they were copied into."""
    llm = LLM(model=model, block_size=BS, num_blocks=12, host_cache_memory=40 * HOST_BLOCK)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    a, b, c = session_starts(3, 23, seed=5)
    out = llm.generate([a], params)[0]
    # 23 prompt tokens + 2 computed replies: 6 full blocks, the last one completed by the reply
    hashes = engine.cache._hashes(Sequence("a", a + out.token_ids, params, frozenset()), 6)
    rows = {h: engine.pool.data[:, engine.cache.allocator.lookup(h)].clone() for h in hashes}
    llm.generate([b, c], params)  # pushes a's blocks out of the 12-block pool
    host, storage = engine.cache.host, engine.runner.host
    assert all(engine.cache.allocator.lookup(h) is None and h in host for h in hashes)
    storage.synchronize()
    for h in hashes:
        assert torch.equal(storage.data[host.block_of[h]], rows[h])
    swapped = llm.stats()["host_cache_blocks_swapped_in"]
    follow = llm.generate([a + out.token_ids + [7, 8, 9]], params)[0]
    assert follow.num_cached_tokens == 24
    assert llm.stats()["host_cache_blocks_swapped_in"] - swapped == 6
    for h in hashes:
        assert torch.equal(engine.pool.data[:, engine.cache.allocator.lookup(h)], rows[h])


def test_moba_page_sums_restored_and_tokens_unchanged():
    pytest.importorskip("moonlet.model.sparse")
    cfg = tiny_k2_config(moba_config={"block_size": 8, "top_k": 2, "full_attention_layers": [2]})
    moba_model = random_model(cfg, seed=5)
    per_block = HOST_BLOCK + 2 * LATENT * 4  # two MoBA layers' page sums, float32
    llm = LLM(model=moba_model, block_size=BS, num_blocks=14, host_cache_memory=40 * per_block)
    assert llm.engine.config.host_block_bytes == per_block
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a, b, c = session_starts(3, 30, seed=6)
    out = llm.generate([a], params)[0]
    hashes = engine.cache._hashes(Sequence("a", a, params, frozenset()), 7)
    sums = engine.runner.kv.page_sums.data
    saved = {h: (engine.pool.data[:, engine.cache.allocator.lookup(h)].clone(),
                 sums[:, engine.cache.allocator.lookup(h)].clone()) for h in hashes}
    llm.generate([b, c], params)
    assert all(engine.cache.allocator.lookup(h) is None for h in hashes)
    prompt = a + out.token_ids + [3, 4, 5]
    follow = llm.generate([prompt], params)[0]
    assert follow.num_cached_tokens >= 28
    for h in hashes:
        block = engine.cache.allocator.lookup(h)
        assert torch.equal(engine.pool.data[:, block], saved[h][0]) and torch.equal(sums[:, block], saved[h][1])
    assert follow.token_ids == greedy_reference(moba_model, prompt, 4)


# ---- the same-step hazards, on the bookkeeping and the storage directly --------------------------------

def make_seq(tokens, rid):
    return Sequence(rid, tokens, SamplingParams(), frozenset())


def computed(mgr: KVCacheManager, seq: Sequence) -> None:
    """As if a step computed the whole sequence: its full blocks get registered."""
    seq.num_computed_tokens = seq.num_tokens
    mgr.cache_full_blocks(seq)


def fill(pool: LatentCachePool, seq: Sequence, value_of) -> None:
    for i, block in enumerate(seq.block_table):
        pool.data[:, block] = value_of(seq, i)


def run_step(mgr: KVCacheManager, storage: HostCachePool, pool: LatentCachePool) -> None:
    """The copies of a step, in the runner's order."""
    swap_out, swap_in = mgr.take_swaps()
    storage.swap_out(swap_out, pool)
    storage.swap_in(swap_in, pool)


def test_block_evicted_and_reused_by_a_swap_in_in_one_step():
    """Two device blocks. A's first block goes to the host tier when B takes both blocks; A's next turn
    hits it on the host, and the swap-in's destination is B's second block, evicted (to the host) in
    the same step: the swap-out must read B's content before the swap-in overwrites it."""
    mgr = KVCacheManager(2, BS, host_blocks=4)
    pool = LatentCachePool(1, 2, BS, 3)
    storage = HostCachePool(pool, 4)
    a = make_seq([1, 2, 3, 4, 5], "a")
    mgr.match_prefix(a)
    assert mgr.allocate(a, 5)
    run_step(mgr, storage, pool)
    pool.data[:, a.block_table[0]] = 10.0
    computed(mgr, a)  # registers its one full block
    mgr.free(a)
    b = make_seq([9, 9, 9, 9, 8, 8, 8, 8, 7], "b")
    mgr.match_prefix(b)
    assert mgr.allocate(b, 8)  # evicts a's block: a swap-out
    run_step(mgr, storage, pool)
    pool.data[:, b.block_table[0]] = 20.0
    pool.data[:, b.block_table[1]] = 21.0
    b.num_computed_tokens = 8
    mgr.cache_full_blocks(b)
    mgr.free(b)  # its second block is freed first: the device LRU's next victim
    a_hash, b_hash = mgr._hashes(a, 1)[0], mgr._hashes(b, 2)[1]
    assert a_hash in mgr.host and mgr.allocator.lookup(a_hash) is None
    again = make_seq([1, 2, 3, 4, 6], "a2")
    assert mgr.match_prefix(again) == BS
    mgr.admit(again)
    swap_out, swap_in = mgr.take_swaps()
    (dst,) = [d for _, d in swap_in]
    assert swap_out and swap_out[0][0] == dst  # the destination was evicted in this very step
    storage.swap_out(swap_out, pool)
    storage.swap_in(swap_in, pool)
    assert torch.equal(pool.data[:, dst], torch.full((1, BS, 3), 10.0))  # a's block, back
    assert torch.equal(storage.data[mgr.host.block_of[b_hash]], torch.full((1, BS, 3), 21.0))  # b's, kept


def test_host_block_read_this_step_is_not_overwritten():
    """A tier of one block holding B's block. A step swaps B's block in from it and then, allocating
    for the rest of the prompt, evicts C's cached block, whose copy could only go to that same host
    block: the eviction is dropped instead of overwriting what the swap-in reads."""
    mgr = KVCacheManager(2, BS, host_blocks=1)
    pool = LatentCachePool(1, 2, BS, 2)
    storage = HostCachePool(pool, 1)
    b = make_seq([7, 7, 7, 7, 5], "b")
    mgr.match_prefix(b)
    assert mgr.allocate(b, 5)
    pool.data[:, b.block_table[0]] = 2.0
    computed(mgr, b)
    mgr.free(b)
    c = make_seq([5, 5, 5, 5, 1], "c")
    mgr.match_prefix(c)
    assert mgr.allocate(c, 5)  # evicts b's block to the host
    run_step(mgr, storage, pool)
    pool.data[:, c.block_table[0]] = 3.0
    computed(mgr, c)
    mgr.free(c)
    b_hash, c_hash = mgr._hashes(b, 1)[0], mgr._hashes(c, 1)[0]
    assert b_hash in mgr.host and mgr.allocator.lookup(c_hash) is not None
    again = make_seq([7, 7, 7, 7, 9], "b2")
    assert mgr.match_prefix(again) == BS  # from the host, into the plain free block
    assert mgr.allocate(again, 1)  # the second block: evicts c's
    mgr.admit(again)
    swap_out, swap_in = mgr.take_swaps()
    assert swap_out == [] and len(swap_in) == 1  # c's copy found the only host block pinned: dropped
    assert c_hash not in mgr.host and mgr.allocator.lookup(c_hash) is None
    storage.swap_out(swap_out, pool)
    storage.swap_in(swap_in, pool)
    assert torch.equal(pool.data[:, again.block_table[0]], torch.full((1, BS, 2), 2.0))


def test_swap_in_called_off_when_admission_fails():
    """Planned swap-ins of a sequence that is not admitted are called off: no copy in the step, the
    destination block is a plain free block again (its hash unknown on the device: its content never
    arrived), and the host block is no longer pinned."""
    mgr = KVCacheManager(3, BS, host_blocks=4)
    a = make_seq(list(range(2, 11)), "a")  # 2 full blocks + 1
    mgr.match_prefix(a)
    assert mgr.allocate(a, a.num_tokens)
    computed(mgr, a)
    mgr.free(a)
    filler = make_seq([50] * 12, "f")  # takes all three blocks: a's two cached blocks go to the host
    mgr.match_prefix(filler)
    assert mgr.allocate(filler, 12)
    assert len(mgr.take_swaps()[0]) == 2
    computed(mgr, filler)
    mgr.free(filler)
    again = make_seq(list(range(2, 11)) + [1], "a2")
    assert mgr.match_prefix(again) == 2 * BS  # two swap-ins planned ...
    hashes = mgr._hashes(again, 2)
    dst = list(again.block_table)
    assert all(mgr.allocator.lookup(h) in dst for h in hashes)
    mgr.free(again)  # ... and called off (the scheduler's path when allocate fails or the budget is short)
    assert all(mgr.allocator.lookup(h) is None for h in hashes)
    assert all(h in mgr.host for h in hashes)  # still in the tier
    swap_out, swap_in = mgr.take_swaps()
    assert swap_in == [] and mgr.num_free_blocks == 3
    assert not mgr.host._pinned
    # the next one to match gets them from the host again, and is counted once it is admitted
    again2 = make_seq(list(range(2, 11)) + [1], "a3")
    assert mgr.match_prefix(again2) == 2 * BS
    mgr.admit(again2)
    assert len(mgr.take_swaps()[1]) == 2 and mgr.counters.host_blocks_swapped_in == 2


def test_host_hits_leave_room_for_the_first_chunk():
    """A host hit is taken only while the free blocks cover it and the first chunk after it (the rest of
    the prompt, or the step's token budget of it); the allocation for that chunk then succeeds."""
    mgr = KVCacheManager(3, BS, host_blocks=8)
    a = make_seq(list(range(2, 11)), "a")  # 2 full blocks + 1 token
    mgr.match_prefix(a)
    assert mgr.allocate(a, 9)
    computed(mgr, a)
    mgr.free(a)
    hog = make_seq([60] * 12, "hog")
    mgr.match_prefix(hog)
    assert mgr.allocate(hog, 12)  # a's two cached blocks go to the host
    mgr.free(hog)  # never computed: three plain free blocks
    mgr.take_swaps()
    prompt = list(range(2, 10)) + [70] * 9  # a's two full blocks + 9 tokens: 5 blocks in all
    for budget, hit in ((None, 0), (8, BS), (4, 2 * BS)):
        seq = make_seq(prompt, f"b{budget}")
        assert mgr.match_prefix(seq, token_budget=budget) == hit
        first_chunk = seq.num_uncomputed_tokens if budget is None else min(seq.num_uncomputed_tokens, budget)
        assert mgr.allocate(seq, first_chunk) == (budget is not None)
        mgr.free(seq)
        assert mgr.take_swaps() == ([], []) and mgr.num_free_blocks == 3


# ---- preemption and aborts in a random workload ---------------------------------------------------------

def test_preemption_and_aborts_with_swaps_in_flight_match_reference(model):
    """Sessions sharing prefixes, a device pool that preempts, a host tier small enough to evict, chunked
    prefill, and requests aborted at random steps (some in the step right after their swap-ins). Every
    request that finishes gives the tokens of a run with a large pool and no tier (and of the model's
    greedy loop); each step's copies hit the hazards this tier must order correctly."""
    rng = random.Random(7)
    shared = session_starts(1, 17, seed=8)[0]
    starts = [shared + s for s in session_starts(6, 9, seed=9)]
    common = dict(block_size=BS, max_num_batched_tokens=20)
    llm = LLM(model=model, **common, num_blocks=16, host_cache_memory=20 * HOST_BLOCK)
    reference = LLM(model=model, **common, num_blocks=400)
    engine = llm.engine
    seen = {"same_step_reuse": 0, "swap_ins": 0}
    swap = engine.runner.swap

    def spy(batch):
        if set(d for d, _ in batch.swap_out) & set(d for _, d in batch.swap_in):
            seen["same_step_reuse"] += 1
        seen["swap_ins"] += len(batch.swap_in)
        swap(batch)

    engine.runner.swap = spy
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    convs = [list(s) for s in starts]
    finished: list[tuple[list[int], list[int]]] = []
    aborted = 0
    for turn in range(3):
        ids = {}
        for i, conv in enumerate(convs):
            ids[f"t{turn}-{i}"] = (i, conv)
            engine.add_request(f"t{turn}-{i}", conv, params)
        results: dict[str, list[int]] = {}
        while engine.has_unfinished():
            hits_before = engine.cache.counters.host_blocks_swapped_in
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.token_ids
            running = [s.request_id for s in engine.scheduler.running]
            # abort a running request now and then, more often right after a step that swapped blocks in
            chance = 0.25 if engine.cache.counters.host_blocks_swapped_in > hits_before else 0.05
            if running and rng.random() < chance:
                engine.abort_request(rng.choice(running))
                aborted += 1
        for rid, (i, conv) in ids.items():
            if rid in results:
                finished.append((conv, results[rid]))
                convs[i] = conv + results[rid] + [rng.randrange(2, 320) for _ in range(5)]
            else:
                convs[i] = conv + [rng.randrange(2, 320) for _ in range(5)]
    stats = llm.stats()
    assert aborted > 0 and stats["preemptions"] > 0 and stats["requests_aborted"] == aborted
    assert seen["swap_ins"] > 0 and seen["same_step_reuse"] > 0
    assert stats["blocks_free"] == stats["blocks_total"]
    expected = reference.generate([p for p, _ in finished], params)
    assert [t for _, t in finished] == [o.token_ids for o in expected]
    for prompt, tokens in finished[-3:]:
        assert tokens == greedy_reference(model, prompt, len(tokens))


def test_server_metrics_report_the_host_tier(model):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from moonlet.server.metrics import ServerMetrics

    llm = LLM(model=model, block_size=BS, num_blocks=14, max_num_batched_tokens=32, host_cache_memory=64 * HOST_BLOCK)
    run_sessions(llm, session_starts(3, 22, seed=2), turns=2)
    stats = llm.stats()
    text = ServerMetrics(llm.engine).render().decode()
    value = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert value["moonlet_host_cache_hits_total"] == stats["host_cache_hits"] > 0
    assert value["moonlet_host_cache_blocks_swapped_in_total"] == stats["host_cache_blocks_swapped_in"] > 0
    assert value["moonlet_host_cache_blocks_swapped_out_total"] == stats["host_cache_blocks_swapped_out"] > 0
    assert value["moonlet_host_cache_swapped_in_bytes_total"] == HOST_BLOCK * stats["host_cache_blocks_swapped_in"]
    assert value["moonlet_host_cache_swapped_out_bytes_total"] == HOST_BLOCK * stats["host_cache_blocks_swapped_out"]
    assert value["moonlet_host_cache_blocks_total"] == 64
    assert value["moonlet_host_cache_blocks_used"] == stats["host_cache_blocks_used"] > 0


# ---- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,match", [
    (-1, "must be >= 0"),
    ("lots", "cannot read 'lots' as a memory size"),
    (True, "must be a number of bytes"),
    (100, r"smaller than one host block \(9216 bytes: 16 tokens x 3 layers"),
    ("100TiB", "more than the host's available memory"),
])
def test_bad_host_cache_memory_is_a_clear_error(value, match):
    with pytest.raises(ValueError, match=match):
        resolve(EngineConfig(host_cache_memory=value), tiny_k2_config(), torch.device("cpu"), torch.float32)


def test_host_tier_refused_without_prefix_caching_or_for_hybrid_models():
    with pytest.raises(ValueError, match="prefix caching is off"):
        resolve(EngineConfig(host_cache_memory="1MiB", enable_prefix_caching=False), tiny_k2_config(),
                torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="does not support models with KDA layers"):
        resolve(EngineConfig(host_cache_memory="1MiB"), tiny_kimi_linear_config(), torch.device("cpu"),
                torch.float32)


def test_host_tier_sizing_and_flag():
    rc = resolve(EngineConfig(host_cache_memory=10 * HOST_BLOCK + 7, block_size=BS), tiny_k2_config(),
                 torch.device("cpu"), torch.float32)
    assert rc.host_blocks == 10 and rc.host_block_bytes == HOST_BLOCK
    assert resolve(EngineConfig(host_cache_memory=0), tiny_k2_config(), torch.device("cpu"),
                   torch.float32).host_blocks == 0
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    assert engine_args_from_cli(parser.parse_args(["--host-cache-memory", "8GiB"]))["host_cache_memory"] == "8GiB"
    assert "host_cache_memory" not in engine_args_from_cli(parser.parse_args([]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_tier_is_pinned_and_restores_blocks(model):
    llm = LLM(model=model, device="cuda", block_size=BS, num_blocks=14, host_cache_memory=64 * HOST_BLOCK,
              decode_graphs="off")
    assert llm.engine.runner.host.data.is_pinned()
    starts = session_starts(4, 22, seed=1)
    got = run_sessions(llm, starts, turns=3)
    reference = run_sessions(LLM(model=model, device="cuda", block_size=BS, num_blocks=400, decode_graphs="off"),
                             starts, turns=3)
    assert [r[1] for r in got] == [r[1] for r in reference]
    assert [r[2] for r in got] == [r[2] for r in reference]
    assert llm.stats()["host_cache_hits"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_swap_in_reads_a_block_swapped_out_in_the_same_step():
    """The swap-out is asynchronous into pinned memory; a swap-in of the same host block right after it
    (one step) must see the copied rows, not what the host block held before."""
    pool = LatentCachePool(2, 4, BS, 8, device="cuda")
    pool.data.normal_()
    storage = HostCachePool(pool, 2, pin_memory=True)
    storage.data.fill_(float("nan"))
    storage.swap_out([(0, 1), (2, 0)], pool)
    storage.swap_in([(1, 3)], pool)
    torch.cuda.synchronize()
    assert torch.equal(pool.data[:, 3], pool.data[:, 0])
    storage.synchronize()
    assert torch.equal(storage.data[0].cuda(), pool.data[:, 2])
