"""Prefix caching for a hybrid model (Kimi Linear: KDA + MLA) through recurrent-state snapshots.

Every generation is checked against the model's own full-sequence greedy forward (no cache at all),
and the counters against the hit the snapshot policy promises: a request sharing a finished one's
prompt up to its last block boundary resumes there, a conversation's next turn resumes at the last
block boundary the previous turn's decode crossed, with chunked prefill, preemption, concurrent
requests, and a snapshot pool or block pool too small to keep everything (then: recompute, same
tokens). After each run every block, slot and snapshot row is accounted for.
"""

import argparse

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.cache import KVCacheManager, StateSnapshots
from moonlet.engine.config import EngineConfig, add_engine_cli_args, engine_args_from_cli, resolve
from moonlet.engine.sequence import Sequence
from moonlet.testing import greedy_reference, random_model, tiny_kimi_linear_config

BS = 4  # cache block size in these tests
MAX_TOKENS = 8


def greedy(n=MAX_TOKENS):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    # KDA, MLA, KDA, KDA: the MLA layer's latents come from the pages, the KDA layers' state from a snapshot
    return random_model(tiny_kimi_linear_config(vocab_size=96, max_position_embeddings=512, linear_attn_config=dict(
        kda_layers=[1, 3, 4], full_attn_layers=[2], num_heads=2, head_dim=8, short_conv_kernel_size=4)), seed=7)


@pytest.fixture(scope="module")
def base():
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, 96, (37,), generator=g).tolist()  # 9 full blocks + 1 token


@pytest.fixture(scope="module")
def ref(model):
    memo = {}

    def run(prompt, n=MAX_TOKENS):
        key = (tuple(prompt), n)
        if key not in memo:
            memo[key] = greedy_reference(model, prompt, n)
        return memo[key]
    return run


def check_consistent(llm):
    """Nothing running: every block and slot free; every snapshot row either named or free, none
    pending, and every named snapshot's last block still in the prefix cache."""
    cache = llm.engine.cache
    stats = llm.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["blocks_free"] == stats["blocks_total"]
    assert sorted(cache._free_slots) == list(range(cache.state_slots))
    snaps = cache.snapshots
    assert not snaps._pending
    assert sorted(list(snaps.row_of.values()) + snaps._free) == list(range(snaps.capacity))
    assert all(digest in cache.allocator.cached for digest in snaps.row_of)
    assert not cache._branch_at and not cache._branch_pending


def hits(llm):
    return llm.stats()["prefix_cache_hits"]


ENGINES = {
    "whole": dict(num_blocks=96, block_size=BS),
    # chunks of 5 tokens: snapshot points fall inside chunks, which the KDA layers split there
    "chunked": dict(num_blocks=96, block_size=BS, max_num_batched_tokens=5),
    "block8": dict(num_blocks=48, block_size=8),
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_shared_prefix_and_next_turn_resume_from_snapshots(model, base, ref, name):
    args = ENGINES[name]
    bs = args["block_size"]
    llm = LLM(model=model, **args)
    assert llm.engine.config.enable_prefix_caching and llm.engine.config.state_snapshots == 128
    first = llm.generate([base], greedy())[0]
    assert first.token_ids == ref(base) and first.num_cached_tokens == 0
    assert hits(llm) == 0

    # a second request sharing the first one's prompt up to its last full block boundary
    prompt_point = (len(base) - 1) // bs * bs
    second_prompt = base[:prompt_point] + [5, 6, 7]
    second = llm.generate([second_prompt], greedy())[0]
    assert second.num_cached_tokens == prompt_point
    assert hits(llm) == prompt_point
    assert second.token_ids == ref(second_prompt)

    # the next turn of the first conversation: its prompt + its reply + more; resumes where the
    # reply's decode last crossed a block boundary (the reply's last token was never computed)
    turn2 = base + first.token_ids + [9, 10, 11]
    decode_point = (len(base) + MAX_TOKENS - 1) // bs * bs
    assert decode_point > prompt_point
    reply = llm.generate([turn2], greedy())[0]
    assert reply.num_cached_tokens == decode_point
    assert hits(llm) == prompt_point + decode_point
    assert reply.token_ids == ref(turn2)

    # the very same prompt again (a retry) hits at its own last boundary before the last token
    again = llm.generate([base], greedy())[0]
    assert again.num_cached_tokens == prompt_point and again.token_ids == first.token_ids
    check_consistent(llm)


def test_a_long_generation_keeps_one_output_snapshot(model, base, ref):
    llm = LLM(model=model, num_blocks=96, block_size=BS)
    out = llm.generate([base], greedy(30))[0]
    assert out.token_ids == ref(base, 30)
    # one snapshot at the prompt's last boundary, one (rewritten 7 times) at the decode's latest
    assert llm.stats()["state_snapshots"] == 2
    assert llm.stats()["state_snapshots_saved"] == 1 + (len(base) + 29) // BS - len(base) // BS
    check_consistent(llm)


def test_tiny_snapshot_pool_evicts_and_falls_back_to_recompute(model, base, ref):
    llm = LLM(model=model, num_blocks=96, block_size=BS, state_snapshots=1)
    first = llm.generate([base], greedy(2))[0]  # 37 + 1 computed: no decode boundary, prompt snapshot at 36
    assert llm.stats()["state_snapshots"] == 1
    other = [3] * 21
    llm.generate([other], greedy(2))  # its snapshot takes the only row
    shared = base[:36] + [8, 8]
    out = llm.generate([shared], greedy())[0]
    assert out.num_cached_tokens == 0 and hits(llm) == 0  # blocks cached, but no state to resume from
    assert out.token_ids == ref(shared)
    assert first.token_ids == ref(base, 2)
    check_consistent(llm)


def test_evicted_blocks_drop_their_snapshot(model, base, ref):
    # 12 blocks: the first request's 10 blocks are cached when it finishes; an unrelated request of
    # 10 blocks must evict most of them, and with them the snapshot at their end
    llm = LLM(model=model, num_blocks=12, block_size=BS, max_num_seqs=2)
    llm.generate([base], greedy(2))
    assert llm.stats()["state_snapshots"] == 1
    unrelated = [4, 5] * 18
    llm.generate([unrelated], greedy(3))
    shared = base[:36] + [8]
    out = llm.generate([shared], greedy())[0]
    assert out.num_cached_tokens == 0 and out.token_ids == ref(shared)
    check_consistent(llm)


def test_no_prefix_caching_flag_turns_it_off(model, base, ref):
    llm = LLM(model=model, num_blocks=96, block_size=BS, enable_prefix_caching=False)
    assert llm.engine.cache.snapshots is None and llm.engine.config.state_snapshots == 0
    for _ in range(2):
        assert llm.generate([base], greedy())[0].token_ids == ref(base)
    assert hits(llm) == 0


def test_zero_snapshots_means_no_hits(model, base, ref):
    llm = LLM(model=model, num_blocks=96, block_size=BS, state_snapshots=0)
    outs = [llm.generate([base], greedy())[0] for _ in range(2)]
    assert [o.token_ids for o in outs] == [ref(base)] * 2 and hits(llm) == 0


def test_preemption_with_prefix_hits(model, base, ref):
    # 24 blocks of 4 tokens for four ~45-token sequences: some are preempted and recomputed, and their
    # recompute resumes from snapshots where their blocks survived
    prompts = [base, base[:36] + [5, 6], base[:36] + [7] * 6, base[:20]]
    llm = LLM(model=model, num_blocks=24, block_size=BS, max_num_batched_tokens=24)
    outs = llm.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == [ref(p) for p in prompts]
    assert llm.stats()["preemptions"] > 0
    again = llm.generate(prompts, greedy())
    assert [o.token_ids for o in again] == [ref(p) for p in prompts]
    assert hits(llm) > 0
    check_consistent(llm)


def test_concurrent_requests_share_a_running_sequences_prefix(model, base, ref):
    llm = LLM(model=model, num_blocks=96, block_size=BS, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("a", base, greedy(20))
    while engine.requests["a"].num_output_tokens == 0:  # prefill done: its prompt snapshot is named
        engine.step()
    followers = {"b": base[:36] + [1, 2, 3], "c": base[:36] + [9], "d": base + [44, 45, 46, 47, 48]}
    for rid, prompt in followers.items():
        engine.add_request(rid, prompt, greedy())
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["a"].token_ids == ref(base, 20)
    for rid, prompt in followers.items():
        assert finished[rid].num_cached_tokens == 36, rid
        assert finished[rid].token_ids == ref(prompt), rid
    check_consistent(llm)


def test_abort_mid_decode_keeps_snapshots_consistent(model, base, ref):
    llm = LLM(model=model, num_blocks=96, block_size=BS, max_num_seqs=2)
    engine = llm.engine
    engine.add_request("a", base, greedy(40))
    for _ in range(12):
        engine.step()
    engine.abort_request("a")
    check_consistent(llm)
    # what it computed before the abort is still a valid prefix for the next request
    seen = engine.cache.snapshots.num_saved
    assert seen >= 2
    out = llm.generate([base], greedy())[0]
    assert out.num_cached_tokens == 36 and out.token_ids == ref(base)
    check_consistent(llm)


def test_one_token_prompt_in_a_reused_slot_starts_from_zeros(model, base, ref):
    # a one-token prompt runs as a decode; its slot must be cleared, not read (it held `base`'s state)
    llm = LLM(model=model, num_blocks=96, block_size=BS, max_num_seqs=1)
    llm.generate([base], greedy(3))
    assert llm.generate([[9]], greedy())[0].token_ids == ref([9])


def test_lookup_needs_the_whole_chain_and_a_snapshot_at_its_end():
    mgr = KVCacheManager(num_blocks=16, block_size=4, state_slots=2, state_snapshots=2)
    tokens = list(range(2, 23))  # 21 tokens: 5 full blocks
    seq = Sequence("a", tokens, SamplingParams(), frozenset())
    assert mgr.match_prefix(seq) == 0 and mgr.allocate(seq, 21)
    assert mgr.state_init(seq) == (seq.state_slot, None)  # starts at token 0: zeros
    [(offset, row)] = mgr.plan_snapshot(seq, 21)
    assert offset == 20  # the last boundary before the last token
    seq.num_computed_tokens = 21
    mgr.cache_full_blocks(seq)
    blocks = list(seq.block_table)
    mgr.free(seq)

    hit = Sequence("b", tokens[:20] + [1, 1], SamplingParams(), frozenset())
    assert mgr.match_prefix(hit) == 20 and hit.snapshot_restore == row
    assert mgr.allocate(hit, 2)
    assert mgr.state_init(hit) == (hit.state_slot, row)
    mgr.free(hit)

    # a prefix of the chain without a snapshot at its end: no hit, no blocks taken; the end of the
    # matched chain (3 blocks) is a branch point, dropped with the sequence
    short = Sequence("c", tokens[:13], SamplingParams(), frozenset())
    assert mgr.match_prefix(short) == 0 and short.block_table == [] and short.snapshot_restore is None
    assert mgr._branch_at == {short: 12}
    mgr.free(short)
    assert not mgr._branch_at

    # a block in the middle of the chain evicted: the snapshot at the end is unreachable
    alloc = mgr.allocator
    victim = blocks[2]
    alloc.acquire_cached(victim)
    alloc._uncache(victim)
    alloc.release(victim)
    assert mgr.match_prefix(Sequence("d", tokens, SamplingParams(), frozenset())) == 0

    # the block at the snapshot's end evicted: the snapshot is dropped with it
    assert len(mgr.snapshots) == 1
    alloc.acquire_cached(blocks[4])
    alloc._uncache(blocks[4])
    assert len(mgr.snapshots) == 0


def test_snapshot_rows_lru_and_replacement():
    snaps = StateSnapshots(2)
    r0 = snaps.reserve(b"a")
    snaps.commit(b"a")
    r1 = snaps.reserve(b"b")
    snaps.commit(b"b")
    assert {r0, r1} == {0, 1}
    assert snaps.get(b"a") == r0  # a used: b is now the oldest
    r2 = snaps.reserve(b"c")
    assert r2 == r1 and snaps.get(b"b") is None
    assert snaps.reserve(b"d") == r0  # a, the only named one left, is reused
    assert snaps.reserve(b"e") is None  # every row is being written this step
    snaps.commit(b"c")
    snaps.commit(b"d")
    assert snaps.reserve(b"f", replace=b"d") == r0 and snaps.get(b"c") == r1


def test_snapshot_memory_comes_out_of_the_cache_budget(model):
    cfg = model.config
    per_state = cfg.kda_state_bytes(4)
    per_block = 1 * 16 * cfg.latent_dim * 4  # one MLA layer, block 16, float32
    budget = 256_000  # below what 8 full-length sequences could use: the budget decides
    for snaps, expected_state_rows in ((None, 8 + 8), (3, 8 + 3), (0, 8 + 0)):
        rc = resolve(EngineConfig(kv_cache_memory=budget, max_num_seqs=8, block_size=16, state_snapshots=snaps),
                     cfg, torch.device("cpu"), torch.float32)
        assert rc.num_blocks == (budget - expected_state_rows * per_state) // per_block
        assert rc.state_snapshots == expected_state_rows - 8
    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    assert engine_args_from_cli(parser.parse_args(["--state-snapshots", "5"])) == {"state_snapshots": 5}
    with pytest.raises(ValueError, match="state_snapshots=-1"):
        EngineConfig(state_snapshots=-1).validate()


# ---- branch points: requests sharing a prefix that ends mid-block and mid-prompt ----------------------

SHARED = 22  # base[:22]: 5 full blocks of 4 + 2 tokens; the tails below differ from token 22 on
BRANCH = 20  # the last block boundary of the shared part: where the third and later requests resume


def tail(first, n):
    return [first] + [(first * 7 + i) % 90 + 2 for i in range(n - 1)]


# B: 31 tokens, its branch point 20 and its prompt-end point 28 (chunk boundaries in brackets):
BRANCH_ENGINES = {
    "whole": (dict(num_blocks=96, block_size=BS), True),  # [0, 31): cut at 20 and at 28
    "chunk16": (dict(num_blocks=96, block_size=BS, max_num_batched_tokens=16), True),  # [16, 31): both in chunk 2
    "chunk7": (dict(num_blocks=96, block_size=BS, max_num_batched_tokens=7), False),  # [14, 21): 20 inside;
    # its last chunk [28, 31) starts at the prompt-end point, so no prompt-end snapshot
    "chunk5": (dict(num_blocks=96, block_size=BS, max_num_batched_tokens=5), False),  # [15, 20): 20 at its end
}


@pytest.mark.parametrize("name", list(BRANCH_ENGINES))
def test_third_request_hits_at_the_branch_point(model, base, ref, name):
    args, prompt_end_snapshot = BRANCH_ENGINES[name]
    llm = LLM(model=model, **args)
    snaps = llm.engine.cache.snapshots
    a = base[:SHARED] + tail(50, 8)
    b = base[:SHARED] + tail(60, 9)
    c = base[:SHARED] + tail(70, 5)
    out_a = llm.generate([a], greedy())[0]
    assert out_a.num_cached_tokens == 0 and out_a.token_ids == ref(a)
    # b matches a's first 5 blocks, but no snapshot lies on them: no hit; it snapshots at 20 while computing
    out_b = llm.generate([b], greedy())[0]
    assert out_b.num_cached_tokens == 0 and out_b.token_ids == ref(b)
    assert snaps.num_branch_saved == 1
    # the third request sharing the prefix resumes at the branch point
    out_c = llm.generate([c], greedy())[0]
    assert out_c.num_cached_tokens == BRANCH and out_c.token_ids == ref(c)
    assert snaps.num_branch_saved == 1  # c matched no further than its hit: no new branch point
    assert hits(llm) == BRANCH and llm.stats()["state_snapshots_branch"] == 1
    # b's prompt-end snapshot, taken in the same chunk as its branch snapshot where the chunks allow
    d = b[:28] + [9, 9]
    out_d = llm.generate([d], greedy())[0]
    assert out_d.token_ids == ref(d)
    if prompt_end_snapshot:
        assert out_d.num_cached_tokens == 28 and snaps.num_branch_saved == 1
    else:  # resumes at the branch point and, matching b's blocks up to 28, snapshots there for the next
        assert out_d.num_cached_tokens == BRANCH and snaps.num_branch_saved == 2
        e = b[:28] + [10]
        out_e = llm.generate([e], greedy())[0]
        assert out_e.num_cached_tokens == 28 and out_e.token_ids == ref(e)
    check_consistent(llm)


def test_branch_points_off_keeps_the_old_policy(model, base, ref):
    llm = LLM(model=model, num_blocks=96, block_size=BS)
    llm.engine.cache.branch_snapshots = False
    prompts = [base[:SHARED] + tail(t, 8) for t in (50, 60, 70)]
    outs = [llm.generate([p], greedy())[0] for p in prompts]
    assert [o.token_ids for o in outs] == [ref(p) for p in prompts]
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0]
    assert llm.engine.cache.snapshots.num_branch_saved == 0
    check_consistent(llm)


def test_evicted_branch_snapshot_is_taken_again(model, base, ref):
    # two snapshot rows: an unrelated request's prompt-end and output snapshots evict the branch one
    llm = LLM(model=model, num_blocks=96, block_size=BS, state_snapshots=2)
    snaps = llm.engine.cache.snapshots
    a, b, c, e = (base[:SHARED] + tail(t, 8) for t in (50, 60, 70, 80))
    llm.generate([a], greedy())
    llm.generate([b], greedy())
    assert snaps.num_branch_saved == 1
    llm.generate([[3] * 21], greedy())
    out_c = llm.generate([c], greedy())[0]
    assert out_c.num_cached_tokens == 0 and out_c.token_ids == ref(c)  # blocks cached, state evicted
    assert snaps.num_branch_saved == 2  # c found the chain again beyond its (empty) hit: snapshots there
    out_e = llm.generate([e], greedy())[0]
    assert out_e.num_cached_tokens == BRANCH and out_e.token_ids == ref(e)
    check_consistent(llm)


def test_evicted_shared_blocks_drop_the_branch_snapshot(model, base, ref):
    # 14 blocks: an unrelated 13-block request evicts the shared prefix's blocks, and the branch
    # snapshot with them
    llm = LLM(model=model, num_blocks=14, block_size=BS, max_num_seqs=2)
    a, b, c = (base[:SHARED] + tail(t, 8) for t in (50, 60, 70))
    llm.generate([a], greedy(2))
    llm.generate([b], greedy(2))
    assert llm.engine.cache.snapshots.num_branch_saved == 1
    llm.generate([[4, 5] * 25], greedy(2))
    out_c = llm.generate([c], greedy())[0]
    assert out_c.num_cached_tokens == 0 and out_c.token_ids == ref(c)
    check_consistent(llm)


def test_swarm_submitted_together_hits_at_the_branch_point(model, base, ref):
    # eight sub-agents with the same 22-token prefix and different tasks, in one generate call with a
    # small token budget, so they are admitted over several steps: the first ones compute everything,
    # one of those admitted once the first's blocks are cached snapshots the branch point, the rest hit
    prompts = [base[:SHARED] + tail(40 + 5 * i, 6 + i % 3) for i in range(8)]
    llm = LLM(model=model, num_blocks=96, block_size=BS, max_num_batched_tokens=32)
    outs = llm.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == [ref(p) for p in prompts]
    cached = [o.num_cached_tokens for o in outs]
    assert set(cached) == {0, BRANCH} and cached[-1] == BRANCH and cached.count(BRANCH) >= 4
    assert llm.engine.cache.snapshots.num_branch_saved >= 1
    check_consistent(llm)


def test_plan_snapshot_gives_the_branch_and_prompt_end_points():
    mgr = KVCacheManager(num_blocks=32, block_size=4, state_slots=2, state_snapshots=4)
    first = Sequence("a", list(range(2, 32)), SamplingParams(), frozenset())  # 30 tokens
    mgr.match_prefix(first)
    mgr.allocate(first, 30)
    assert [off for off, _ in mgr.plan_snapshot(first, 30)] == [28]
    first.num_computed_tokens = 30
    mgr.cache_full_blocks(first)
    mgr.free(first)
    # shares 22 tokens: 5 full blocks match, no snapshot on them
    second = Sequence("b", list(range(2, 24)) + [90] * 9, SamplingParams(), frozenset())
    assert mgr.match_prefix(second) == 0 and mgr._branch_at[second] == 20
    mgr.allocate(second, 31)
    assert mgr.plan_snapshot(second, 16) == []  # chunk [0, 16): neither point reached
    second.num_computed_tokens = 16
    mgr.cache_full_blocks(second)
    saves = mgr.plan_snapshot(second, 15)  # chunk [16, 31): the branch point, then the prompt end
    assert [off for off, _ in saves] == [4, 12] and len({row for _, row in saves}) == 2
    second.num_computed_tokens = 31
    mgr.cache_full_blocks(second)
    assert mgr.snapshots.num_branch_saved == 1 and len(mgr.snapshots) == 3
    mgr.free(second)
    third = Sequence("c", list(range(2, 24)) + [91] * 3, SamplingParams(), frozenset())
    assert mgr.match_prefix(third) == 20 and third not in mgr._branch_at


def test_chunk_cut_at_two_points_writes_the_states_there(model):
    """RecurrentStates.run with two snapshots inside one prefill chunk: each snapshot row holds the KDA
    layer's state after that many tokens, computed here by the layer alone on that prefix; the output
    and the slot equal one uncut run."""
    from moonlet.engine.attention import BatchLayout, PrefillSpan
    from moonlet.engine.recurrent import RecurrentStates

    layer = model.config.kda_layer_ids[0]
    module = model.model.layers[layer].self_attn
    x = torch.randn(1, 11, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    states = RecurrentStates(model.config, num_slots=2, dtype=torch.float32, device="cpu", num_snapshots=3)
    layout = BatchLayout(positions=torch.arange(11), slot_mapping=torch.arange(11), num_decodes=0,
                         decode_block_tables=None, decode_ctx_lens=None,
                         prefills=[PrefillSpan(0, 11, 11, torch.tensor([0]), state_slot=1)])
    states.begin_step([(1, None)], [(1, 9, 2), (1, 4, 0)], decode_slots=[])
    with torch.no_grad():
        out = states.run(layer, module, x, layout)
        whole, final = module(x, return_state=True)
        for offset, snap in ((4, 0), (9, 2)):
            _, expect = module(x[:, :offset], return_state=True)
            for got, want in zip(states.states[layer], expect):
                torch.testing.assert_close(got[2 + snap], want[0].to(got.dtype))
    torch.testing.assert_close(out, whole)
    for got, want in zip(states.states[layer], final):
        torch.testing.assert_close(got[1], want[0].to(got.dtype))
    assert all(float(t[2 + 1].abs().sum()) == 0 for t in states.states[layer])  # snapshot 1 untouched
