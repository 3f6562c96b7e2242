"""AsyncLLM: streaming, abort, overload, many concurrent requests."""

import asyncio
import time

import pytest
import torch

from moonlet.engine import AsyncLLM, EngineDeadError, EngineOverloadedError, PromptTooLongError, SamplingParams
from moonlet.testing import random_model, tiny_k2_config


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=5)


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_stream_deltas_add_up_and_match_reference(model):
    prompt = [5, 9, 13, 200, 31, 7]
    with AsyncLLM(model=model, num_blocks=32) as llm:
        async def run():
            outs = [o async for o in llm.generate(prompt, SamplingParams(temperature=0, max_tokens=9,
                                                                         ignore_eos=True), "a")]
            return outs
        outs = asyncio.run(run())
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids == reference_greedy(model, prompt, 9)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert not any(o.finished for o in outs[:-1])
        assert wait_until(lambda: llm.stats()["blocks_free"] == 32)


def test_leaving_the_stream_aborts_and_frees_blocks(model):
    with AsyncLLM(model=model, num_blocks=32) as llm:
        async def run():
            got = 0
            async for _ in llm.generate([3, 4, 5], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)):
                got += 1
                if got == 3:
                    break
            # explicit abort: the stream ends with finish_reason 'abort'
            outs = []
            async for o in llm.generate([6, 7, 8], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True),
                                        "b"):
                outs.append(o)
                if len(outs) == 2:
                    await llm.abort("b")
            return outs
        outs = asyncio.run(run())
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        assert wait_until(lambda: llm.stats()["blocks_free"] == 32 and llm.stats()["running"] == 0)
        assert llm.stats()["requests_aborted"] == 2


def test_request_errors_surface_at_first_iteration(model):
    with AsyncLLM(model=model, num_blocks=4, block_size=4) as llm:
        async def first(prompt):
            return await llm.generate(prompt, SamplingParams(max_tokens=2)).__anext__()
        with pytest.raises(PromptTooLongError, match="17 tokens.*16"):
            asyncio.run(first(list(range(2, 19))))
        assert llm.max_model_len == 16


def test_overload_when_waiting_queue_is_full(model):
    llm = AsyncLLM(model=model, num_blocks=32, max_waiting=2, start=False)

    async def run():
        gens = [llm.generate([1 + i, 2, 3], SamplingParams(max_tokens=2)) for i in range(3)]
        firsts = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await asyncio.sleep(0.05)  # all three have tried to enqueue; the engine is not started
        assert firsts[2].done() and isinstance(firsts[2].exception(), EngineOverloadedError)
        llm.start()
        done = await asyncio.gather(*firsts[:2])
        for g in gens:
            await g.aclose()
        return done

    try:
        done = asyncio.run(run())
        assert len(done) == 2
    finally:
        llm.shutdown()
    with pytest.raises(EngineDeadError):
        asyncio.run(llm.generate([1, 2], SamplingParams()).__anext__())
    assert llm.stats()["blocks_free"] == 32


def test_200_concurrent_requests_complete_and_free_every_block(model):
    n = 200
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 320, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    shared = prompts[0][:16]
    prompts = [shared + p if i % 4 == 0 else p for i, p in enumerate(prompts)]  # some prefix sharing
    with AsyncLLM(model=model, kv_cache_memory="4MiB", max_num_seqs=64) as llm:
        async def one(i):
            text_tokens = []
            async for out in llm.generate(prompts[i], SamplingParams(temperature=0.8, max_tokens=12, seed=i,
                                                                     ignore_eos=True)):
                text_tokens.extend(out.new_token_ids)
            assert text_tokens == out.token_ids and out.finish_reason == "length"
            return len(out.token_ids)

        async def run():
            return await asyncio.gather(*(one(i) for i in range(n)))

        lengths = asyncio.run(run())
        assert lengths == [12] * n
        assert wait_until(lambda: llm.stats()["running"] == 0)
        stats = llm.stats()
        assert stats["blocks_free"] == stats["blocks_total"]
        assert stats["requests_finished"] == n and stats["generation_tokens_total"] == 12 * n
        assert stats["prefix_cache_hits"] > 0


def test_a_crashed_engine_loop_fails_open_requests(model):
    llm = AsyncLLM(model=model, num_blocks=32)

    def broken(batch):
        raise RuntimeError("kernel exploded")

    llm.engine.runner.execute = broken
    try:
        async def run():
            return await llm.generate([1, 2, 3], SamplingParams(max_tokens=3)).__anext__()
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            asyncio.run(run())
        assert wait_until(lambda: not llm.is_running)
        assert llm.stats()["engine_alive"] is False
        with pytest.raises(EngineDeadError):
            asyncio.run(run())
    finally:
        llm.shutdown()


def test_duplicate_request_id_is_refused(model):
    with AsyncLLM(model=model, num_blocks=32) as llm:
        async def run():
            first = llm.generate([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), "same")
            await first.__anext__()
            with pytest.raises(ValueError, match="already in use"):
                await llm.generate([4, 5], SamplingParams(max_tokens=2), "same").__anext__()
            await first.aclose()
        asyncio.run(run())
        assert wait_until(lambda: llm.stats()["blocks_free"] == 32)


def test_samples_count_toward_the_waiting_limit(model):
    """max_waiting counts sequences: a request with n = 3 fills three of the places, queued or parked."""
    llm = AsyncLLM(model=model, num_blocks=32, max_waiting=4, start=False)

    async def run():
        big = llm.generate([1, 2, 3], SamplingParams(max_tokens=2, n=3))
        first = asyncio.ensure_future(big.__anext__())
        await asyncio.sleep(0.02)
        small = [llm.generate([4 + i, 5], SamplingParams(max_tokens=2)) for i in range(2)]
        firsts = [asyncio.ensure_future(g.__anext__()) for g in small]
        await asyncio.sleep(0.05)
        assert not firsts[0].done()  # 3 + 1 = 4 places
        assert firsts[1].done() and isinstance(firsts[1].exception(), EngineOverloadedError)
        llm.start()
        await asyncio.gather(first, firsts[0])
        for g in [big] + small:
            await g.aclose()

    try:
        asyncio.run(run())
        assert wait_until(lambda: llm.stats()["running"] == 0 and llm.stats()["waiting"] == 0)
    finally:
        llm.shutdown()
    assert llm.engine.scheduler.num_parked == 0 and llm.stats()["blocks_free"] == 32


def test_parked_count_follows_the_groups(model):
    from moonlet.engine import LLM

    llm = LLM(model=model, num_blocks=64)
    core = llm.engine
    core.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, n=4))
    core.add_request("b", [6, 7, 8], SamplingParams(max_tokens=3, n=2))
    sched = core.scheduler
    assert sched.num_parked == 4 == sum(len(rest) for rest in sched.parked.values())
    core.abort_request("b")
    assert sched.num_parked == 3
    while core.has_unfinished():
        core.step()
        assert sched.num_parked == sum(len(rest) for rest in sched.parked.values())
    assert sched.num_parked == 0
