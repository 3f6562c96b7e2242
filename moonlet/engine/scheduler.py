"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (``max_num_batched_tokens``) and a cap on running sequences
(``max_num_seqs``). Running sequences come first: decodes (one token each) before unfinished
prefills, so a long prompt never stalls the decodes; a prefill takes what budget is left and
continues next step (chunked prefill). Waiting requests are admitted in arrival order after a
prefix-cache lookup, as far as budget, sequence cap and free blocks allow.

When a running sequence needs a block and none is free, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of the waiting queue, to
be recomputed later (its full blocks usually survive in the prefix cache, so the recompute is often
a cache hit).

Models with KDA layers: the batch also says what each scheduled sequence's recurrent-state slot
must hold before the forward (zeros for a sequence starting at token 0, a snapshot for a prefix hit)
and which states the forward should snapshot (``KVCacheManager.plan_snapshot``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache import KVCacheManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` computes ``num_new_tokens[i]`` tokens starting at its
    num_computed_tokens. Single-token entries (decodes) come first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # models with KDA layers: (slot, snapshot row or None for zeros) to load before the forward, and
    # (slot, offset, snapshot row): copy the slot's state after its first `offset` new tokens
    state_inits: list[tuple[int, int | None]] = field(default_factory=list)
    state_saves: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prompt_tokens_total = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler (finished or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.cache.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: dict[Sequence, int] = {}  # insertion order = batch order
        preempted: list[Sequence] = []

        # 1. running sequences: decodes first, then prefills that are still being chunked
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        chunked = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + chunked:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.cache.allocate(seq, n):
                victim = self.running[-1]  # lowest priority: admitted last
                budget += chosen.pop(victim, 0)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chosen[seq] = n
                budget -= n

        # 2. waiting requests, in order, unless this step already had to preempt
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.cache.match_prefix(seq)
            n = seq.num_uncomputed_tokens
            if n > budget:
                if not self.enable_chunked_prefill:
                    self.cache.free(seq)
                    seq.num_computed_tokens = 0
                    break
                n = budget
            if not self.cache.allocate(seq, n):
                self.cache.free(seq)  # give back the prefix-hit blocks; retry when blocks free up
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.cache.record_lookup(seq.num_tokens, hit)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = hit
                self.prompt_tokens_total += seq.num_prompt_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen[seq] = n
            budget -= n

        batch = ScheduledBatch(preempted=preempted)
        # decodes (1 token) first, as the runner's layout wants
        for seq, n in sorted(chosen.items(), key=lambda item: item[1] != 1):
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            if seq.state_slot is not None:
                init = self.cache.state_init(seq)
                if init is not None:
                    batch.state_inits.append(init)
                for offset, row in self.cache.plan_snapshot(seq, n):
                    batch.state_saves.append((seq.state_slot, offset, row))
        return batch
