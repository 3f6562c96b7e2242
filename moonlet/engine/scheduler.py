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

Priority scheduling (``policy="priority"``): the waiting queue is kept in order of
(``SamplingParams.priority``, arrival) — lower values first, vLLM's convention — so admission takes
the most urgent request that fits next, and the preemption victim is the running sequence with the
largest (priority, arrival): the least urgent, the latest among equals. A preempted sequence goes
back to its place in that order. Running sequences are not preempted to admit a more urgent one.

A sequence whose prompt logprobs are still to be computed (``Sequence.needs_prompt_logprobs``) takes
no prefix-cache hit: every prompt position's logits are needed. Its blocks are still cached for others.

Speculative decoding (``proposer`` set, see ``spec``): after every running decode has its token,
each decode may take drafts — ``1 + d`` tokens of budget and the cache slots for them — from what
budget is left and from blocks that the running prefill chunks will not need this step. When
either is short, it takes fewer drafts (down to none); drafts never preempt anything. A decode with
drafts is scheduled as a multi-token entry (its verification span) and its drafts are in
``ScheduledBatch.draft_tokens``.

Models with KDA layers: the batch also says what each scheduled sequence's recurrent-state slot
must hold before the forward (zeros for a sequence starting at token 0, a snapshot for a prefix hit)
and which states the forward should snapshot (``KVCacheManager.plan_snapshot``).

Parallel sampling (``SamplingParams.n``, ``add_group``): the n sequences of one request share its
prompt through the prefix cache. Sample 0 is queued as any request; samples 1..n-1 are parked beside
the queue (they never hold up the requests behind them) until sample 0's prompt is computed, its full
blocks registered, and then go to the front of the queue, where admission finds those blocks as a
prefix hit and computes only the rest (at most one block; hybrid models resume from the prompt's
snapshot). They are released as well when sample 0 finishes, is aborted or is preempted first.

Host cache tier (``KVCacheManager.host``): evicting a cached block while scheduling (any allocation)
may copy it to host memory, and admitting a request whose prefix continues in the host tier copies
those blocks back into fresh device blocks. Both are lists on the batch (``swap_out``, ``swap_in``)
that the runner executes before the forward, swap-outs first.
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
    # speculative decoding: the draft tokens of the sequences that verify drafts this step; such a
    # sequence computes its last token and then these (num_new_tokens = 1 + len(drafts))
    draft_tokens: dict[Sequence, list[int]] = field(default_factory=dict)
    # host cache tier: (device block, host block) copies of evicted blocks, then (host block, device
    # block) copies of host prefix hits; both run before the forward, in this order
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # disk tier: (block content read from disk, device block) of admitted disk prefix hits; copied in
    # after the host tier's copies, before the forward
    disk_in: list = field(default_factory=list)
    # models with KDA layers and speculative decoding: per verifying sequence, the snapshot rows its state
    # is copied to after each of its drafts (offsets 1 .. drafts), and the (source row, destination row)
    # state copies the last verification left to do, run before anything else (EngineCore.step)
    spec_state_rows: dict[Sequence, list[int]] = field(default_factory=dict)
    state_copies: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, proposer=None, spec_state_rows: tuple[int, int] = (0, 0),
                 lora=None, policy: str = "fcfs", max_lora_wait_steps: int = 32):
        self.cache = cache
        # multi-LoRA serving (moonlet.engine.lora.MultiLora): a request's adapter must be resident to run;
        # a request whose adapter cannot get a slot waits while later requests are admitted past it
        self.lora = lora
        self.max_lora_wait_steps = max_lora_wait_steps
        self.policy = policy  # "fcfs" or "priority" (EngineConfig.scheduling_policy)
        # speculative decoding: None, or an object with max_drafts(seq) and either propose(seq) -> draft
        # token ids (n-gram) or, when its ``batched`` is true, propose_batch([(seq, k)]) -> lists (draft model)
        self.proposer = proposer
        # hybrid models: (first snapshot index, count) of the state rows verification spans write into, and
        # the state copies a verification left for the next step (EngineCore.step fills it)
        self.spec_state_rows = spec_state_rows
        self.pending_state_copies: list[tuple[int, int]] = []
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.priority_preemptions = 0  # of them, to admit a more urgent waiting request (priority policy)
        self.prompt_tokens_total = 0
        # parallel sampling: sample 0 of a request -> its other samples, waiting for its prompt; their
        # count is kept as a plain int (read from other threads: AsyncLLM's admission check)
        self.parked: dict[Sequence, list[Sequence]] = {}
        self.num_parked = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_group(self, seqs: list[Sequence]) -> None:
        """Queue the samples of one request (``SamplingParams.n``), sample 0 first. With prefix caching
        the others are parked until sample 0's prompt is cached (see the module docstring); without
        it there is nothing to share and all are queued at once."""
        self.add(seqs[0])
        if len(seqs) > 1 and self.cache.allocator.enable_prefix_caching:
            for seq in seqs[1:]:
                seq.status = SequenceStatus.WAITING
            self.parked[seqs[0]] = list(seqs[1:])
            self.num_parked += len(seqs) - 1
        else:
            for seq in seqs[1:]:
                self.add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.parked)

    def _release(self, leaders: list[Sequence]) -> None:
        """Move the parked samples of these sample-0 sequences to the front of the queue, in order."""
        for leader in reversed(leaders):
            for seq in reversed(self.parked.pop(leader, ())):
                self.waiting.appendleft(seq)
                self.num_parked -= 1

    def _release_ready(self) -> None:
        """Release the samples whose sample 0 has computed its prompt (the step after which its full
        blocks are registered)."""
        if self.parked:
            self._release([leader for leader in self.parked if leader.status is SequenceStatus.RUNNING
                           and leader.num_computed_tokens >= leader.num_prompt_tokens])

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler (finished or aborted) and free its blocks. A removed
        sample 0 releases its parked samples; a parked sample leaves its group."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            if not self._unpark(seq):
                self.waiting.remove(seq)
        self._release([seq])
        self.cache.free(seq)
        if self.lora is not None:
            self.lora.release(seq)
        seq.status = SequenceStatus.FINISHED

    def _unpark(self, seq: Sequence) -> bool:
        """Take ``seq`` out of the parked samples; False when it is not parked."""
        for leader, rest in self.parked.items():
            if seq in rest:
                rest.remove(seq)
                self.num_parked -= 1
                if not rest:
                    del self.parked[leader]
                return True
        return False

    def _victim(self) -> Sequence:
        """The running sequence to preempt: the one admitted last (FCFS), or the least urgent — largest
        (priority, arrival), the latest admitted among equals (priority policy)."""
        if self.policy != "priority":
            return self.running[-1]
        return max(reversed(self.running), key=lambda s: (s.params.priority, s.arrival_time))

    @staticmethod
    def _urgency(seq: Sequence) -> tuple:
        return (seq.params.priority, seq.arrival_time)

    def _less_urgent_running(self, seq: Sequence) -> bool:
        key = self._urgency(seq)
        return any(self._urgency(s) > key for s in self.running)

    def _priority_victims(self, seq: Sequence, num_new_tokens: int, need_seat: bool) -> list[Sequence] | None:
        """Priority policy: the running sequences to preempt, least urgent first, so that waiting ``seq``
        (its prefix hit already taken) gets ``num_new_tokens`` slots — and a seat, ``need_seat``, when
        ``max_num_seqs`` are running; only sequences strictly less urgent than ``seq``. None when even
        all of them would not make room (then nobody is preempted: no thrash for nothing). A victim's
        blocks count as freed only where it holds them alone."""
        key = self._urgency(seq)
        cache = self.cache
        need = cache.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        need_slot = bool(getattr(cache, "state_slots", 0)) and getattr(seq, "state_slot", None) is None \
            and not getattr(cache, "_free_slots", True)
        refs = cache.allocator.ref_count
        free, victims = cache.num_free_blocks, []
        for victim in sorted(self.running, key=self._urgency, reverse=True):
            if free >= need and (victims or not (need_seat or need_slot)):
                break
            if self._urgency(victim) <= key:
                return None
            victims.append(victim)
            free += sum(1 for b in victim.block_table if refs[b] == 1)
        if free < need or (not victims and (need_seat or need_slot)):
            return None
        return victims

    def _order_waiting(self) -> None:
        """Priority policy: sort the waiting queue by (priority, arrival), in place (stable: equal keys
        keep their order; a nearly sorted queue sorts in linear time)."""
        if self.policy == "priority" and len(self.waiting) > 1:
            ordered = sorted(self.waiting, key=lambda s: (s.params.priority, s.arrival_time))
            self.waiting.clear()
            self.waiting.extend(ordered)

    def _preempt(self, seq: Sequence) -> None:
        self._release([seq])  # its blocks leave; the full ones stay cached for the parked samples
        self.running.remove(seq)
        self.cache.free(seq)
        if self.lora is not None:
            self.lora.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _add_drafts(self, decodes: list[Sequence], chunked: list[Sequence], budget: int,
                    chosen: dict[Sequence, int], drafts: dict[Sequence, list[int]]) -> int:
        """Give scheduled decodes their drafts, as far as ``budget`` and the free blocks allow (the
        blocks the running prefill chunks can take this step stay reserved for them, so drafts never
        cause a preemption). Returns the budget used."""
        reserved, left = 0, budget
        for seq in chunked:
            n = min(seq.num_uncomputed_tokens, left)
            left -= n
            reserved += max(0, self.cache.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table))
        spare_blocks = self.cache.num_free_blocks - reserved
        bs = self.cache.block_size
        used = 0
        if getattr(self.proposer, "batched", False):
            return self._add_batched_drafts(decodes, budget, spare_blocks, chosen, drafts)
        rows_left = self.spec_state_rows[1]
        for seq in decodes:
            if used == budget:
                break
            proposal = self.proposer.propose(seq)[:budget - used]
            if seq.state_slot is not None:  # a hybrid model: one state row per draft
                proposal = proposal[:rows_left]
            if not proposal:
                continue
            # slots the sequence's table already has past its next token, plus the spare blocks
            room = (len(seq.block_table) + max(spare_blocks, 0)) * bs - seq.num_computed_tokens - 1
            proposal = proposal[:max(room, 0)]
            if not proposal:
                continue
            before = len(seq.block_table)
            if not self.cache.allocate(seq, 1 + len(proposal)):  # cannot happen: room counted free blocks
                continue
            spare_blocks -= len(seq.block_table) - before
            drafts[seq] = proposal
            chosen[seq] = 1 + len(proposal)
            used += len(proposal)
            if seq.state_slot is not None:
                rows_left -= len(proposal)
        return used

    def _add_batched_drafts(self, decodes: list[Sequence], budget: int, spare_blocks: int,
                            chosen: dict[Sequence, int], drafts: dict[Sequence, list[int]]) -> int:
        """``_add_drafts`` for a proposer that drafts for all sequences at once (a draft model): first
        each decode's number of drafts from its limits, the budget and the spare blocks, and the slots
        for them (the draft model writes its own latents of the drafts there too), then one
        ``propose_batch``. Returns the budget used."""
        bs = self.cache.block_size
        used = 0
        plans: list[tuple[Sequence, int]] = []
        rows_left = self.spec_state_rows[1]
        for seq in decodes:
            k = min(self.proposer.max_drafts(seq), budget - used)
            room = (len(seq.block_table) + max(spare_blocks, 0)) * bs - seq.num_computed_tokens - 1
            k = min(k, room)
            if seq.state_slot is not None:  # a hybrid model: one state row per draft
                k = min(k, rows_left)
            if k <= 0:
                continue
            if seq.state_slot is not None:
                rows_left -= k
            before = len(seq.block_table)
            if not self.cache.allocate(seq, 1 + k):  # cannot happen: room counted free blocks
                continue
            spare_blocks -= len(seq.block_table) - before
            plans.append((seq, k))
            used += k
        if not plans:
            return 0
        used = 0
        for (seq, k), proposal in zip(plans, self.proposer.propose_batch(plans)):
            proposal = proposal[:k]
            if proposal:
                drafts[seq] = proposal
                chosen[seq] = 1 + len(proposal)
                used += len(proposal)
        return used

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: dict[Sequence, int] = {}  # insertion order = batch order
        preempted: list[Sequence] = []

        drafts: dict[Sequence, list[int]] = {}
        self._release_ready()

        def run(seq: Sequence) -> None:  # schedule a running sequence's known tokens, preempting if needed
            nonlocal budget
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.cache.allocate(seq, n):
                victim = self._victim()
                budget += chosen.pop(victim, 0)
                drafts.pop(victim, None)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chosen[seq] = n
                budget -= n

        # 1. running sequences: decodes first, then (speculative decoding) their drafts, then prefills
        # that are still being chunked
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        chunked = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes:
            if budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING:  # else preempted earlier in this loop
                run(seq)
        if self.proposer is not None and budget > 0 and not preempted:
            budget -= self._add_drafts([s for s in decodes if s in chosen], chunked, budget, chosen, drafts)
        for seq in chunked:
            if budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING:
                run(seq)

        # 2. waiting requests, in order (the policy's), unless this step already had to preempt; a request
        # whose LoRA adapter cannot be made resident (every slot held by running requests) is skipped,
        # keeping its place
        if not preempted:
            self._order_waiting()
        skipped: list[Sequence] = []
        starving = False  # a skipped request has waited max_lora_wait_steps: adapter requests stop passing it
        while self.waiting and not preempted and budget > 0:
            seq = self.waiting[0]
            full = len(self.running) >= self.max_num_seqs
            if full and (self.policy != "priority" or not self._less_urgent_running(seq)):
                break
            if self.lora is not None and seq.params.lora is not None:
                if starving:
                    skipped.append(self.waiting.popleft())
                    continue
                if not self.lora.acquire(seq):
                    seq.lora_wait_steps += 1
                    starving = seq.lora_wait_steps > self.max_lora_wait_steps
                    skipped.append(self.waiting.popleft())
                    continue
            if seq.needs_prompt_logprobs:  # every prompt position's logits are needed: no prefix hit
                hit = seq.num_computed_tokens = 0
            else:
                hit = self.cache.match_prefix(seq, budget)
            n = seq.num_uncomputed_tokens
            if n > budget:
                if not self.enable_chunked_prefill:
                    self.cache.free(seq)
                    seq.num_computed_tokens = 0
                    if self.lora is not None:
                        self.lora.release(seq)
                    break
                n = budget
            if full or not self.cache.allocate(seq, n):
                # the priority policy makes room by preempting less urgent running sequences, when that
                # is enough for this one; otherwise (and under FCFS) it waits for blocks to free up
                victims = self._priority_victims(seq, n, full) if self.policy == "priority" else None
                if victims is not None:
                    self.waiting.popleft()  # before the victims go back to the front of the queue
                    for victim in victims:
                        budget += chosen.pop(victim, 0)
                        drafts.pop(victim, None)
                        self._preempt(victim)
                        preempted.append(victim)
                    if self.cache.allocate(seq, n):
                        self.priority_preemptions += len(victims)
                        victims = "admitted"
                    else:  # cannot happen: the victims' own blocks were counted
                        self.waiting.appendleft(seq)
                        victims = None
                if victims is None:
                    self.cache.free(seq)  # give back the prefix-hit blocks; retry when blocks free up
                    seq.num_computed_tokens = 0
                    if self.lora is not None:
                        self.lora.release(seq)
                    break
            else:
                self.waiting.popleft()
            self.cache.record_lookup(seq.num_tokens, hit)
            self.cache.admit(seq)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = hit
                self.prompt_tokens_total += seq.num_prompt_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen[seq] = n
            budget -= n
            if seq in self.parked and hit == (seq.num_tokens - 1) // self.cache.block_size * self.cache.block_size:
                self._release([seq])  # its prompt was cached already: the others hit as much right now

        self.waiting.extendleft(reversed(skipped))  # back in their places, ahead of the rest

        batch = ScheduledBatch(preempted=preempted, draft_tokens=drafts)
        batch.swap_out, batch.swap_in = self.cache.take_swaps()
        batch.disk_in = self.cache.take_disk_loads()
        batch.state_copies, self.pending_state_copies = self.pending_state_copies, []
        next_row = self.spec_state_rows[0]
        # decodes (1 token) first, as the runner's layout wants
        for seq, n in sorted(chosen.items(), key=lambda item: item[1] != 1):
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            if seq.state_slot is not None:
                init = self.cache.state_init(seq)
                if init is not None:
                    batch.state_inits.append(init)
                # a verification span: the snapshot plan covers its known token only; the state after each
                # draft goes to a row of its own until the verification says which one is right
                for offset, row in self.cache.plan_snapshot(seq, 1 if seq in drafts else n):
                    batch.state_saves.append((seq.state_slot, offset, row))
                if seq in drafts:
                    rows = list(range(next_row, next_row + len(drafts[seq])))
                    next_row += len(rows)
                    batch.spec_state_rows[seq] = rows
                    batch.state_saves.extend((seq.state_slot, j + 1, row) for j, row in enumerate(rows))
        return batch
