"""The disk tier of the prefix cache (``disk_cache_dir``).

The decisive case: an engine serves a prompt and is closed; a new engine (a fresh object over the same
directory, as after a restart) serves the same prompt, its prefix-cache hit comes from disk, and its
greedy tokens and logprobs equal a run without any cache and the model's own greedy loop. Also: damaged
files (bit flip, truncation, zeros, another block's file, another layout's header) are misses and are
recomputed; another model or layout gets its own directory and never the first one's blocks; the size
cap evicts least recently used files (the order surviving restarts); the host and disk tiers together
give exactly the hits of a pool that never evicts; FP8 pools and MoBA page sums come back bit-identical;
writes beyond the queue are dropped and counted; settings and metrics.
"""

import argparse
import logging
import os
import threading
import time

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.cache import KVCacheManager, block_hash
from moonlet.engine.config import EngineConfig, add_engine_cli_args, engine_args_from_cli, resolve
from moonlet.engine.disk_cache import HEADER, BlockLayout, DiskBlockStore
from moonlet.engine.sequence import Sequence
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_kimi_linear_config

BS = 4
LAYERS, LATENT = 3, 48  # tiny_k2_config: 3 layers, kv_lora 32 + rope 16
FILE = HEADER.size + LAYERS * BS * LATENT * 4  # bytes of one block file, float32 pool
HOST_BLOCK = LAYERS * BS * LATENT * 4


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=11)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def chain(prompt: list[int], n: int) -> list[bytes]:
    """The hashes of the prompt's first n full blocks, computed here (what names the files)."""
    out: list[bytes] = []
    for i in range(n):
        out.append(block_hash(out[-1] if out else None, prompt[i * BS:(i + 1) * BS]))
    return out


def block_files(root) -> dict[bytes, str]:
    """Every block file under the disk cache root, by the hash its name gives."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".kv"):
                found[bytes.fromhex(name[:-3])] = os.path.join(dirpath, name)
    return found


def engine(model, directory, **kw) -> LLM:
    return LLM(model=model, block_size=BS, num_blocks=kw.pop("num_blocks", 64), disk_cache_dir=directory, **kw)


PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)


def assert_logprobs_close(got, want, tol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert all(abs(g[t] - w[t]) < tol for t in g)


def test_restart_serves_the_prompt_from_disk(model, tmp_path):
    prompt = tokens(37, seed=1)
    with engine(model, tmp_path) as first:
        cold = first.generate([prompt], PARAMS)[0]
    assert cold.num_cached_tokens == 0
    # 37 prompt tokens + 5 computed outputs: 10 full blocks, each named by its chain hash
    files = block_files(tmp_path)
    assert set(files) == set(chain(prompt + cold.token_ids, 10))
    assert all(os.path.getsize(p) == FILE for p in files.values())

    with engine(model, tmp_path) as second:  # a fresh engine: its device pool starts empty
        warm = second.generate([prompt], PARAMS)[0]
        stats = second.stats()
    assert warm.num_cached_tokens == 36  # 9 full prompt blocks (the last prompt token is always computed)
    assert stats["disk_cache_hits"] == stats["prefix_cache_hits"] == 36
    assert stats["disk_cache_blocks_read"] == 9 and stats["disk_cache_bytes_read"] == 9 * FILE
    assert stats["disk_cache_blocks_written"] == 0  # it computed nothing the tier lacks
    # independent references: no cache at all, and the model's own greedy loop
    with LLM(model=model, block_size=BS, num_blocks=64, enable_prefix_caching=False) as plain:
        ref = plain.generate([prompt], PARAMS)[0]
    assert warm.token_ids == ref.token_ids == cold.token_ids == greedy_reference(model, prompt, 6)
    assert_logprobs_close(warm.logprobs, ref.logprobs)

    # the conversation's next turn, in a third engine: the first engine's reply blocks hit too
    follow = prompt + warm.token_ids + tokens(5, seed=2)
    with engine(model, tmp_path) as third:
        out = third.generate([follow], PARAMS)[0]
        assert third.stats()["disk_cache_hits"] == out.num_cached_tokens == 40
    assert out.token_ids == greedy_reference(model, follow, 6)


@pytest.mark.parametrize("damage", ["flip", "truncate", "zeros", "other_block", "other_layout"])
def test_damaged_file_is_a_miss_and_recomputed(model, tmp_path, damage):
    prompt = tokens(37, seed=3)
    with engine(model, tmp_path) as first:
        first.generate([prompt], PARAMS)
    hashes = chain(prompt, 9)
    files = block_files(tmp_path)
    path = files[hashes[4]]
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[HEADER.size + 1000] ^= 0x40
    elif damage == "truncate":
        data = data[:-100]
    elif damage == "zeros":  # a renamed file whose data never reached the disk (power loss, no fsync)
        data = bytearray(len(data))
    elif damage == "other_block":  # a valid file under the wrong name
        data = bytearray(open(files[hashes[5]], "rb").read())
    else:  # another layout's header (its payload and CRC intact)
        data[24:40] = bytes(16)
    with open(path, "wb") as f:
        f.write(data)
    with engine(model, tmp_path) as second:
        out = second.generate([prompt], PARAMS)[0]
        stats = second.stats()
        second.engine.disk.flush()
    assert out.num_cached_tokens == stats["disk_cache_hits"] == 4 * BS  # the chain stops at the bad block
    assert stats["disk_cache_corrupt"] == 1
    assert out.token_ids == greedy_reference(model, prompt, 6)
    # the bad file was deleted and the recomputed block written again: a third engine hits it all
    with engine(model, tmp_path) as third:
        assert third.generate([prompt], PARAMS)[0].num_cached_tokens == 36
        assert third.stats()["disk_cache_corrupt"] == 0


def test_other_model_or_layout_gets_its_own_directory(model, tmp_path, caplog):
    prompt = tokens(29, seed=4)
    with engine(model, tmp_path) as first:
        first.generate([prompt], PARAMS)
    other = random_model(tiny_k2_config(), seed=12)  # same config, other weights
    with caplog.at_level(logging.WARNING, logger="moonlet.engine.disk_cache"):
        with engine(other, tmp_path) as second:
            out = second.generate([prompt], PARAMS)[0]
            assert second.stats()["disk_cache_hits"] == out.num_cached_tokens == 0
    assert "other models' or layouts' caches beside it" in caplog.text
    assert out.token_ids == greedy_reference(other, prompt, 6)
    with LLM(model=model, block_size=8, num_blocks=32, disk_cache_dir=tmp_path) as third:  # another block size
        assert third.generate([prompt], PARAMS)[0].num_cached_tokens == 0
    subdirs = sorted(p.name for p in tmp_path.iterdir())
    assert len(subdirs) == 3
    with engine(model, tmp_path) as again:  # the first model's blocks are untouched
        assert again.generate([prompt], PARAMS)[0].num_cached_tokens == 28
        first_dir = again.engine.disk.directory
    # a directory whose manifest names another fingerprint is refused, not loaded
    (first_dir / "manifest.json").write_text('{"fingerprint": "0123"}')
    with pytest.raises(ValueError, match="holds blocks of another model or cache layout"):
        engine(model, tmp_path)


def test_size_cap_evicts_least_recently_used_across_restarts(model, tmp_path):
    a, b, c, d = (tokens(13, seed=s) for s in (5, 6, 7, 8))  # 13 tokens, 1 output: 3 full blocks each
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    cap = 6 * FILE + 10
    with engine(model, tmp_path, disk_cache_size=cap) as first:
        for p in (a, b, c):
            first.generate([p], one)
            first.engine.disk.flush()
        stats = first.stats()
    assert set(block_files(tmp_path)) == set(chain(b, 3) + chain(c, 3))  # a's went first
    assert stats["disk_cache_blocks_evicted"] == 3 and stats["disk_cache_bytes_used"] == 6 * FILE <= cap
    time.sleep(0.05)  # (file times order the LRU after a restart: keep the phases apart)
    with engine(model, tmp_path, disk_cache_size=cap) as second:
        assert second.generate([b], one)[0].num_cached_tokens == 12  # b read back: now most recently used
    time.sleep(0.05)
    with engine(model, tmp_path, disk_cache_size=cap) as third:  # the order read from the files' times
        third.generate([d], one)
    assert set(block_files(tmp_path)) == set(chain(b, 3) + chain(d, 3))  # c was the least recently used
    with engine(model, tmp_path, disk_cache_size=3 * FILE) as fourth:  # a smaller cap: trimmed on opening
        assert fourth.stats()["disk_cache_blocks_used"] == 3
    assert set(block_files(tmp_path)) == set(chain(d, 3))


def run_sessions(llm: LLM, starts, turns: int, flush: bool):
    """Agent-like: every turn resends the whole history plus new tokens (see test_host_cache.py)."""
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    convs = [list(s) for s in starts]
    records = []
    for turn in range(turns):
        for i, conv in enumerate(convs):
            out = llm.generate([conv], params)[0]
            if flush:  # so that what a later request looks up has landed (writes are asynchronous)
                llm.engine.disk.flush()
            records.append((list(conv), out.token_ids, out.num_cached_tokens))
            convs[i] = conv + out.token_ids + tokens(6, seed=100 * turn + i)
    return records


def test_host_and_disk_tiers_together_match_a_pool_that_never_evicts(model, tmp_path):
    """Device pool of 14 blocks, host tier of 12, disk: blocks go device -> host -> (dropped there) and are
    read back from disk; every session gets exactly the hits of a 400-block pool and its tokens."""
    starts = [tokens(22, seed=20 + i) for i in range(4)]
    small = dict(block_size=BS, num_blocks=14, max_num_batched_tokens=32)
    with LLM(model=model, **small, host_cache_memory=12 * HOST_BLOCK, disk_cache_dir=tmp_path) as tiered:
        got = run_sessions(tiered, starts, turns=3, flush=True)
        stats = tiered.stats()
        host_dropped = tiered.engine.cache.host.num_evicted
    with LLM(model=model, block_size=BS, num_blocks=400, max_num_batched_tokens=32) as large:
        ref = run_sessions(large, starts, turns=3, flush=False)
    assert [r[1] for r in got] == [r[1] for r in ref]
    assert [r[2] for r in got] == [r[2] for r in ref]
    assert stats["host_cache_hits"] > 0 and stats["disk_cache_hits"] > 0 and host_dropped > 0
    assert stats["prefix_cache_hits"] == sum(r[2] for r in got)
    assert stats["blocks_free"] == stats["blocks_total"]
    for prompt, toks, _ in got[-2:]:
        assert toks == greedy_reference(model, prompt, len(toks))


def test_fp8_blocks_come_back_bit_identical(model, tmp_path):
    prompt = tokens(33, seed=9)
    fp8 = dict(kv_cache_dtype="fp8")
    with engine(model, tmp_path, **fp8) as first:
        cold = first.generate([prompt], PARAMS)[0]
        cache, pool = first.engine.cache, first.engine.pool
        hashes = chain(prompt, 8)
        saved = {h: (pool.data[:, cache.allocator.lookup(h)].view(torch.uint8).clone(),
                     pool.scales[:, cache.allocator.lookup(h)].clone()) for h in hashes}
    with engine(model, tmp_path, **fp8) as second:
        warm = second.generate([prompt], PARAMS)[0]
        cache, pool = second.engine.cache, second.engine.pool
        assert warm.num_cached_tokens == second.stats()["disk_cache_hits"] == 32
        for h in hashes:
            block = cache.allocator.lookup(h)
            assert torch.equal(pool.data[:, block].view(torch.uint8), saved[h][0])
            assert torch.equal(pool.scales[:, block], saved[h][1])
    with LLM(model=model, block_size=BS, num_blocks=64, enable_prefix_caching=False, **fp8) as plain:
        ref = plain.generate([prompt], PARAMS)[0]
    assert warm.token_ids == ref.token_ids == cold.token_ids
    assert_logprobs_close(warm.logprobs, ref.logprobs)


def test_moba_page_sums_come_back_and_tokens_unchanged(tmp_path):
    pytest.importorskip("moonlet.model.sparse")
    cfg = tiny_k2_config(moba_config={"block_size": 8, "top_k": 2, "full_attention_layers": [2]})
    moba_model = random_model(cfg, seed=5)
    prompt = tokens(30, seed=10)
    with engine(moba_model, tmp_path) as first:
        first.generate([prompt], PARAMS)
        e = first.engine
        sums = e.runner.kv.page_sums.data
        hashes = chain(prompt, 7)
        saved = {h: (e.pool.data[:, e.cache.allocator.lookup(h)].clone(), sums[:, e.cache.allocator.lookup(h)].clone())
                 for h in hashes}
    assert all(os.path.getsize(p) == FILE + 2 * LATENT * 4 for p in block_files(tmp_path).values())
    with engine(moba_model, tmp_path) as second:
        out = second.generate([prompt], PARAMS)[0]
        e = second.engine
        sums = e.runner.kv.page_sums.data
        assert out.num_cached_tokens == 28
        for h in hashes:
            block = e.cache.allocator.lookup(h)
            assert torch.equal(e.pool.data[:, block], saved[h][0]) and torch.equal(sums[:, block], saved[h][1])
    assert out.token_ids == greedy_reference(moba_model, prompt, 6)


def test_draft_model_catches_up_over_blocks_read_from_disk(model, tmp_path):
    """With a draft model, blocks read from disk carry no draft latents: the draft recomputes them (catch-up)
    and the output is unchanged."""
    draft = random_model(tiny_k2_config(num_hidden_layers=2), seed=13)
    prompt = tokens(37, seed=14)
    spec = dict(speculative="draft", speculative_model=draft, num_speculative_tokens=3)
    with engine(model, tmp_path, **spec) as first:
        first.generate([prompt], PARAMS)
    with engine(model, tmp_path, **spec) as second:
        out = second.generate([prompt], PARAMS)[0]
        stats = second.stats()
    assert out.num_cached_tokens == stats["disk_cache_hits"] == 36
    assert stats["draft_catch_up_tokens"] >= 36 and stats["spec_draft_tokens"] > 0
    assert out.token_ids == greedy_reference(model, prompt, 6)


# ---- the store on its own ---------------------------------------------------------------------------------

LAYOUT = BlockLayout(num_layers=2, block_size=2, latent_dim=3, dtype=torch.float32, fp8_scales=False,
                     num_sum_layers=0)
MANIFEST = {"fingerprint": "ab" * 16}


def parts(value: float) -> list[torch.Tensor]:
    return [torch.full((2, 2, 3), value).view(torch.uint8)]


def test_store_round_trip_and_leftover_temporary_files(tmp_path):
    store = DiskBlockStore(tmp_path, 10 * LAYOUT.file_bytes, LAYOUT, MANIFEST)
    assert store.put(b"a" * 16, parts(1.5))
    store.flush()
    got = store.read(b"a" * 16)
    assert torch.equal(got[0].view(torch.float32), torch.full((2, 2, 3), 1.5))
    assert store.read(b"b" * 16) is None
    # a crash mid-write leaves a temporary file: deleted when the directory is opened next, never read
    tmp = store.path(b"c" * 16).with_name(("c" * 16).encode().hex() + ".kv.tmp.999")
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(b"partial")
    store.close()
    store = DiskBlockStore(tmp_path, 10 * LAYOUT.file_bytes, LAYOUT, MANIFEST)
    assert not tmp.exists() and len(store) == 1 and store.read(b"a" * 16) is not None
    store.close()


def test_full_write_queue_drops_and_counts(tmp_path):
    store = DiskBlockStore(tmp_path, 10 * LAYOUT.file_bytes, LAYOUT, MANIFEST, queue_blocks=1)
    entered, release = threading.Event(), threading.Event()
    write = store._write

    def slow(digest, content):
        entered.set()
        release.wait()
        write(digest, content)

    store._write = slow
    assert store.put(bytes([1]) * 16, parts(1.0))
    assert entered.wait(10)  # the writer holds the first block
    results = [store.put(bytes([i]) * 16, parts(float(i))) for i in range(2, 6)]
    assert results == [True, False, False, False]  # one more fits the queue, the rest are dropped
    assert store.counters.writes_dropped == 3
    release.set()
    store.flush()
    assert store.counters.blocks_written == 2 and len(store) == 2
    assert store.wants(bytes([3]) * 16) and not store.wants(bytes([2]) * 16)  # a dropped block may come again
    store.close()


def test_a_failing_write_is_counted_and_the_writer_goes_on(tmp_path, caplog):
    store = DiskBlockStore(tmp_path, 10 * LAYOUT.file_bytes, LAYOUT, MANIFEST)
    write = store._write
    calls = []

    def failing_once(digest, content):
        calls.append(digest)
        if len(calls) == 1:
            raise RuntimeError("boom")
        write(digest, content)

    store._write = failing_once
    store.put(b"x" * 16, parts(1.0))
    store.flush()  # returns: the failure is counted, the writer thread lives on
    assert store.counters.write_errors == 1 and b"x" * 16 not in store and store.wants(b"x" * 16)
    store.put(b"x" * 16, parts(1.0))
    store.flush()
    assert b"x" * 16 in store and store.read(b"x" * 16) is not None
    store.close()
    assert "writing a block failed" in caplog.text


def test_disk_hits_called_off_when_admission_fails_and_leave_room(tmp_path):
    """Disk hits planned for a request that is then not admitted are called off (their device blocks
    unnamed and free again, nothing loaded by the step); the next request to match gets them; hits are
    taken only while the free blocks also cover the first chunk after them."""
    store = DiskBlockStore(tmp_path, 10 * LAYOUT.file_bytes, LAYOUT, MANIFEST)
    prompt = list(range(2, 12))  # 2 full blocks + 2 tokens
    hashes = chain(prompt, 2)
    for i, h in enumerate(hashes):
        store.put(h, parts(float(i)))
    store.flush()
    mgr = KVCacheManager(3, BS)
    mgr.disk = store
    seq = Sequence("a", prompt, SamplingParams(), frozenset())
    assert mgr.match_prefix(seq) == 2 * BS
    mgr.free(seq)  # the scheduler's path when the first chunk does not get blocks
    assert all(mgr.allocator.lookup(h) is None for h in hashes)
    assert mgr.take_disk_loads() == [] and mgr.num_free_blocks == 3
    again = Sequence("b", prompt, SamplingParams(), frozenset())
    assert mgr.match_prefix(again) == 2 * BS
    mgr.admit(again)
    loads = mgr.take_disk_loads()
    assert [b for _, b in loads] == again.block_table[:2]
    for i, (content, _) in enumerate(loads):
        assert torch.equal(content[0].view(torch.float32), torch.full((2, 2, 3), float(i)))
    assert mgr.counters.disk_cache_hits == 2 * BS and mgr.counters.disk_blocks_loaded == 2
    mgr.free(again)
    small = KVCacheManager(2, BS)  # two blocks: the hits and the rest of the prompt do not both fit
    small.disk = store
    for budget, hit in ((None, 0), (4, BS)):
        seq = Sequence(f"c{budget}", prompt, SamplingParams(), frozenset())
        assert small.match_prefix(seq, token_budget=budget) == hit
        first = seq.num_uncomputed_tokens if budget is None else min(seq.num_uncomputed_tokens, budget)
        assert small.allocate(seq, first) == (budget is not None)
        small.free(seq)
    store.close()


# ---- settings and metrics -------------------------------------------------------------------------------

def test_second_engine_on_the_same_directory_is_refused(model, tmp_path):
    with engine(model, tmp_path):
        with pytest.raises(ValueError, match="in use by another engine"):
            engine(model, tmp_path)
    engine(model, tmp_path).close()  # released on close


@pytest.mark.parametrize("args,match", [
    (dict(disk_cache_size="1GiB"), "needs disk_cache_dir"),
    (dict(disk_cache_dir="x", disk_cache_size=0), "must be > 0 bytes"),
    (dict(disk_cache_dir="x", disk_cache_size="lots"), "cannot read 'lots'"),
    (dict(disk_cache_dir="x", enable_prefix_caching=False), "prefix caching is off"),
    (dict(disk_cache_dir="x", speculative="mtp"), "cannot be combined with speculative='mtp'"),
    (dict(disk_cache_dir="x", tensor_parallel_size=2), "single process only"),
])
def test_bad_disk_settings_are_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        resolve(EngineConfig(**args), tiny_k2_config(), torch.device("cpu"), torch.float32)


def test_disk_tier_refused_for_hybrid_models_and_tiny_caps(model, tmp_path):
    with pytest.raises(ValueError, match="does not support models with KDA layers"):
        resolve(EngineConfig(disk_cache_dir="x"), tiny_kimi_linear_config(), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="smaller than one block file"):
        engine(model, tmp_path, disk_cache_size=FILE - 1)
    with pytest.raises(ValueError, match="more than the filesystem"):
        engine(model, tmp_path, disk_cache_size="1000TiB")


def test_disk_flags():
    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    args = engine_args_from_cli(parser.parse_args(["--disk-cache-dir", "kv", "--disk-cache-size", "20GiB"]))
    assert args["disk_cache_dir"] == "kv" and args["disk_cache_size"] == "20GiB"
    assert EngineConfig(**args).disk_cache_bytes() == 20 * 2**30
    assert "disk_cache_dir" not in engine_args_from_cli(parser.parse_args([]))


def test_server_metrics_report_the_disk_tier(model, tmp_path):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from moonlet.server.metrics import ServerMetrics

    prompt = tokens(21, seed=11)
    with engine(model, tmp_path) as first:
        first.generate([prompt], PARAMS)
    with engine(model, tmp_path, disk_cache_size="1MiB") as llm:
        llm.generate([prompt], PARAMS)
        stats = llm.stats()
        text = ServerMetrics(llm.engine).render().decode()
    value = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert value["moonlet_disk_cache_hits_total"] == stats["disk_cache_hits"] == 20
    assert value["moonlet_disk_cache_blocks_read_total"] == 5
    assert value["moonlet_disk_cache_read_bytes_total"] == 5 * FILE
    assert value["moonlet_disk_cache_bytes_total"] == 2**20
    assert value["moonlet_disk_cache_blocks_used"] == stats["disk_cache_blocks_used"] == 6
    assert value["moonlet_disk_cache_bytes_used"] == 6 * FILE
    assert value["moonlet_disk_cache_writes_dropped_total"] == 0
    assert value["moonlet_disk_cache_corrupt_total"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_restart_serves_the_prompt_from_disk(tmp_path):
    """On CUDA the blocks leave the pool by an asynchronous copy into pinned memory (the writer waits for
    its event) and come back by one upload per part."""
    gpu_model = random_model(tiny_k2_config(), seed=11)
    prompt = tokens(37, seed=1)
    want = greedy_reference(gpu_model, prompt, 6)
    kw = dict(device="cuda", decode_graphs="off")
    with engine(gpu_model, tmp_path, **kw) as first:
        first.generate([prompt], PARAMS)
    with engine(gpu_model, tmp_path, **kw) as second:
        out = second.generate([prompt], PARAMS)[0]
        assert second.stats()["disk_cache_hits"] == out.num_cached_tokens == 36
    assert out.token_ids == want
