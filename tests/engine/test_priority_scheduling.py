"""Priority scheduling (EngineConfig.scheduling_policy='priority', SamplingParams.priority): admission
order and preemption victims, against the order the policy defines; tokens against the greedy loop."""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.core import build_engine
from moonlet.testing import greedy_reference, random_model, tiny_k2_config


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in (7, 12, 9, 15)]


def run(engine, requests, first_steps=0):
    """Add ``requests`` [(id, prompt, priority)] — the first one, then ``first_steps`` steps, then the
    rest — and step to the end; returns (ids in finishing order, id -> tokens, id -> its sequence)."""
    order, tokens, seqs = [], {}, {}

    def add(rid, prompt, priority):
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, priority=priority)
        seqs[rid] = engine.add_request(rid, prompt, params)

    def step():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                tokens[out.request_id] = out.token_ids

    add(*requests[0])
    for _ in range(first_steps):
        step()
    for r in requests[1:]:
        add(*r)
    while engine.has_unfinished():
        step()
    return order, tokens, seqs


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_later_urgent_request_runs_before_earlier_ones(model, prompts, policy):
    engine = build_engine(model=model, num_blocks=64, max_num_seqs=1, scheduling_policy=policy)
    prio = (lambda p: p) if policy == "priority" else (lambda p: 0)
    requests = [("a", prompts[0], prio(5)), ("b", prompts[1], prio(5)), ("c", prompts[2], prio(3)),
                ("d", prompts[3], prio(-1))]
    order, tokens, seqs = run(engine, requests, first_steps=1)  # "a" is running when the others arrive
    # the priority policy preempts "a" (less urgent) for "d"; "a" then comes back before "b" (equal
    # priority, later arrival)
    assert order == (["d", "c", "a", "b"] if policy == "priority" else ["a", "b", "c", "d"])
    assert seqs["a"].num_preemptions == (1 if policy == "priority" else 0)
    assert engine.stats()["priority_preemptions"] == (1 if policy == "priority" else 0)
    for rid, prompt, _ in requests:
        assert tokens[rid] == greedy_reference(model, prompt, 6)


def test_equal_priorities_keep_arrival_order(model, prompts):
    engine = build_engine(model=model, num_blocks=64, max_num_seqs=1, scheduling_policy="priority")
    order, _, _ = run(engine, [("a", prompts[0], 2), ("b", prompts[1], 1), ("c", prompts[2], 2),
                               ("d", prompts[3], 1)])
    assert order == ["b", "d", "a", "c"]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_the_least_urgent_sequence_is_preempted(model, prompts, policy):
    # two sequences that cannot both grow to the end in 5 blocks of 4: one is preempted. FCFS preempts
    # the one admitted last ("urgent"); the priority policy the least urgent one ("background"),
    # although it was admitted first
    engine = build_engine(model=model, num_blocks=5, block_size=4, max_num_seqs=2, scheduling_policy=policy)
    prio = 0 if policy == "fcfs" else None
    requests = [("background", prompts[0][:6], 9 if prio is None else 0),
                ("urgent", prompts[2][:6], 0)]
    order, tokens, seqs = run(engine, requests, first_steps=1)
    victim = "urgent" if policy == "fcfs" else "background"
    assert seqs[victim].num_preemptions > 0
    assert seqs["background" if victim == "urgent" else "urgent"].num_preemptions == 0
    assert order[0] != victim
    for rid, prompt, _ in requests:
        assert tokens[rid] == greedy_reference(model, prompt, 6)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_priority_on_an_fcfs_engine_and_a_bad_policy_are_errors(model):
    llm = LLM(model=model, num_blocks=8)
    with pytest.raises(ValueError, match="priority=1: this engine schedules first come, first served"):
        llm.generate([[5, 6]], SamplingParams(priority=1))
    with pytest.raises(ValueError, match="scheduling_policy='lifo'"):
        LLM(model=model, num_blocks=8, scheduling_policy="lifo")
    with pytest.raises(ValueError, match="priority"):
        SamplingParams(priority=1.5)


def test_cli_flag():
    import argparse

    from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    assert engine_args_from_cli(parser.parse_args(["--scheduling-policy", "priority"]))["scheduling_policy"] == \
        "priority"
    assert "scheduling_policy" not in engine_args_from_cli(parser.parse_args([]))


def test_equal_priorities_never_preempt_each_other(model, prompts):
    engine = build_engine(model=model, num_blocks=64, max_num_seqs=1, scheduling_policy="priority")
    order, _, seqs = run(engine, [("a", prompts[0], 1), ("b", prompts[1], 1), ("c", prompts[2], 2)], first_steps=1)
    assert order == ["a", "b", "c"] and all(s.num_preemptions == 0 for s in seqs.values())


def test_an_urgent_request_takes_the_blocks_of_a_less_urgent_one(model, prompts):
    # 6 blocks of 4: the background request (24 tokens by its end) fills them; the urgent one cannot
    # get blocks until the background one is preempted
    long_prompt = (prompts[3] + prompts[1])[:18]
    engine = build_engine(model=model, num_blocks=6, block_size=4, max_num_seqs=4, scheduling_policy="priority",
                          enable_prefix_caching=False)
    order, tokens, seqs = run(engine, [("background", long_prompt, 5), ("urgent", prompts[0][:6], 0)], first_steps=2)
    assert order == ["urgent", "background"]
    assert seqs["background"].num_preemptions >= 1 and seqs["urgent"].num_preemptions == 0
    assert tokens["background"] == greedy_reference(model, long_prompt, 6)
    assert tokens["urgent"] == greedy_reference(model, prompts[0][:6], 6)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_no_preemption_when_it_would_not_make_room(model, prompts):
    # 7 blocks of 4. "big" (urgent) holds 5, "small" (least urgent) 1; "mid" needs 3. Preempting "small"
    # would free 1 block, not enough, and "big" is more urgent: nobody is preempted, "mid" waits
    engine = build_engine(model=model, num_blocks=7, block_size=4, max_num_seqs=4, scheduling_policy="priority",
                          enable_prefix_caching=False)
    big, small, mid = (prompts[3] + prompts[1])[:17], prompts[0][:3], prompts[2][:9]
    params = lambda p: SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, priority=p)  # noqa: E731
    seqs = {"big": engine.add_request("big", big, params(0)), "small": engine.add_request("small", small, params(9))}
    tokens, order = {}, []

    def step():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                tokens[out.request_id] = out.token_ids

    step()
    assert len(seqs["big"].block_table) == 5 and len(seqs["small"].block_table) == 1
    seqs["mid"] = engine.add_request("mid", mid, params(4))
    step()
    assert seqs["mid"].num_computed_tokens == 0  # not admitted: 1 free block
    assert seqs["small"].num_preemptions == 0 and len(seqs["small"].block_table) == 1  # and nobody preempted
    while engine.has_unfinished():
        step()
    assert engine.stats()["priority_preemptions"] == 0  # (growing later, "small" may be preempted as usual)
    for rid, prompt in (("big", big), ("small", small), ("mid", mid)):
        assert tokens[rid] == greedy_reference(model, prompt, 6)
