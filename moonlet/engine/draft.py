"""Speculative decoding with a draft model (``speculative="draft"``, ``speculative_model=PATH``).

A smaller checkpoint of the same tokenizer (Moonlight-16B-A3B for Kimi K2, a few-layer model for
moonlet-tiny) guesses the next ``k`` tokens of each decoding sequence by its own greedy decoding;
the target then verifies them in one forward exactly as it verifies n-gram drafts (``spec.py``,
``Sampler.verify``), so the output is the target's whatever the draft says. The draft only decides
how many tokens a step yields.

The draft keeps its own paged latent cache, a second ``LatentCachePool`` with the target's block
ids: a sequence's block table addresses both pools, so the draft needs no allocator, no tables and
no eviction policy of its own, and the blocks the scheduler takes for a sequence's drafts hold the
draft's latents of them too. What the draft pool holds is tracked on two levels:

- per sequence (``DraftProgress``): the draft latents are right for positions < ``base`` (its real
  tokens) and for the draft tokens it wrote after them, as long as those were accepted;
- per block (``valid``: block id -> content hash): a full block whose draft latents were computed
  from real tokens is named by the prefix cache's hash of its content, so a later sequence whose
  prefix-cache hit covers it (or the same sequence after a preemption) starts the draft there too.
  Every draft write re-labels the blocks it touches (drafted tokens or a partial block: no label),
  and a reused block id gets another hash, so a label is never stale.

Each call (``propose_batch``, once per scheduler step for all decoding sequences that may take
drafts): a catch-up forward computes each sequence's draft latents from where they stop being right
to its last token (one step's accepted tokens; a whole prompt the first time, at most
``max_catch_up_tokens`` in all per call, the rest next call) and gives the first draft from the
last token's logits; then ``k - 1`` batched single-token steps give the others (decode CUDA graphs
for the draft on CUDA). Drafts are the draft's argmax: deterministic, as ``Sampler.verify`` requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .runner import StepInput
from .spec import SpeculativeConfig, max_drafts

if TYPE_CHECKING:
    from .cache import KVCacheManager
    from .runner import ModelRunner
    from .sequence import Sequence


@dataclass
class DraftProgress:
    """A sequence's draft latents: right for positions < ``base``, then for ``drafts[j]`` at position
    ``base + j`` while the sequence's token there equals it. ``preemptions``: the sequence's count when
    recorded (a preemption frees its blocks, so the record no longer holds)."""

    base: int
    drafts: list[int] = field(default_factory=list)
    preemptions: int = 0


def check_draft_model(target_config, draft_config, target_path=None, draft_path=None) -> None:
    """ValueError when the draft cannot draft for the target: another vocabulary, another tokenizer
    file (when both directories are known and ship one), or KDA layers (the draft's cache holds MLA
    latents only: no recurrent state to keep or rewind)."""
    if draft_config.vocab_size != target_config.vocab_size:
        raise ValueError(f"speculative_model: the draft's vocab_size is {draft_config.vocab_size} but the target's is "
                         f"{target_config.vocab_size}; a draft model must use the target's tokenizer")
    if draft_config.kda_layer_ids:
        raise ValueError(f"speculative_model: the draft has KDA layers ({list(draft_config.kda_layer_ids)}); use a "
                         "draft with MLA attention only")
    if target_path is not None and draft_path is not None:
        a, b = Path(target_path) / "tiktoken.model", Path(draft_path) / "tiktoken.model"
        if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
            raise ValueError(f"speculative_model: {str(draft_path)!r} ships another tokenizer (tiktoken.model differs "
                             f"from the target's); a draft model must use the target's tokenizer")


def build_draft_runner(draft_model, rc) -> "ModelRunner":
    """A ``ModelRunner`` over the draft model and its own latent pool: the engine's block count,
    block size and cache dtype (FP8 too; one scratch block more with decode graphs, as the
    target's), the same attention settings, and decode graphs when the engine uses them. Rank 0 only under tensor parallelism."""
    from .cache import LatentCachePool, latent_layer_ids
    from .runner import ModelRunner

    config = draft_model.config
    scratch = 1 if rc.decode_graphs != "off" else 0
    pool = LatentCachePool(config.num_hidden_layers, rc.num_blocks + scratch, rc.block_size, config.latent_dim,
                           dtype=rc.kv_cache_dtype or draft_model.dtype, device=draft_model.device,
                           layer_ids=latent_layer_ids(config), kv_lora=config.kv_lora_rank)
    runner = ModelRunner(draft_model, pool, expanded_prefill=rc.expanded_prefill, triton_decode=rc.triton_decode)
    if rc.decode_graphs != "off":
        runner.enable_decode_graphs(scratch_block=rc.num_blocks, max_model_len=rc.max_model_len,
                                    batch_sizes=rc.decode_graph_batch_sizes, capture=rc.decode_graphs == "cuda")
    return runner


class DraftModelProposer:
    """Drafts from a draft model for the scheduler (``batched``: one ``propose_batch`` per step).

    ``runner``: a ``ModelRunner`` over the draft model and its pool (same block ids and block size as
    the target's); ``cache``: the target's ``KVCacheManager`` (for block content hashes)."""

    batched = True

    def __init__(self, config: SpeculativeConfig, max_model_len: int, runner: "ModelRunner",
                 cache: "KVCacheManager", max_catch_up_tokens: int):
        if runner.block_size != cache.block_size:
            raise ValueError(f"draft pool block size {runner.block_size} != the engine's {cache.block_size}")
        self.config = config
        self.runner = runner
        self.cache = cache
        self.block_size = cache.block_size
        self.max_model_len = min(max_model_len, runner.model.config.max_position_embeddings)
        self.max_catch_up_tokens = max_catch_up_tokens
        self.valid: dict[int, bytes] = {}  # block id -> hash of the content its draft latents are for
        self.catch_up_tokens = 0  # tokens the catch-up forwards computed (prompts, accepted tokens)
        self.reused_tokens = 0  # tokens whose draft latents a prefix-cache hit provided (no catch-up)
        self.steps = 0  # draft forwards

    def max_drafts(self, seq: "Sequence") -> int:
        return max_drafts(self.config, seq, self.max_model_len)

    # ---- what the draft pool holds -----------------------------------------------------------------
    def _hashes(self, seq: "Sequence", num_full_blocks: int) -> list[bytes]:
        return self.cache._hashes(seq, num_full_blocks)

    def valid_prefix(self, seq: "Sequence") -> int:
        """How many of the sequence's first tokens have right draft latents (at most num_tokens - 1:
        the last token is always computed, for the logits of the first draft)."""
        n = seq.num_tokens
        progress = seq.draft_progress
        if progress is not None and progress.preemptions == seq.num_preemptions:
            end = progress.base
            for d in progress.drafts:
                if end < n and seq.token_ids[end] == d:
                    end += 1
                else:
                    break
            return min(end, n - 1)
        # no record that holds: the full blocks whose draft latents are labelled with their content
        bs, table = self.block_size, seq.block_table
        full = min((n - 1) // bs, len(table))
        end = 0
        for i, digest in enumerate(self._hashes(seq, full)):
            if self.valid.get(table[i]) != digest:
                break
            end += bs
        self.reused_tokens += end
        return end

    def _label(self, seq: "Sequence", start: int, end: int) -> None:
        """Re-label the blocks that positions [start, end) of real tokens were just written to."""
        bs, table = self.block_size, seq.block_table
        full = end // bs
        hashes = self._hashes(seq, full) if full else []
        for i in range(start // bs, -(-end // bs)):
            if i < full:
                self.valid[table[i]] = hashes[i]
            else:
                self.valid.pop(table[i], None)

    def _unlabel(self, seq: "Sequence", start: int, end: int) -> None:
        """Positions [start, end) now hold draft tokens' latents: their blocks name no content."""
        bs, table = self.block_size, seq.block_table
        for i in range(start // bs, -(-end // bs)):
            self.valid.pop(table[i], None)

    # ---- proposing ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose_batch(self, plans: list[tuple["Sequence", int]]) -> list[list[int]]:
        """Up to ``k`` drafts for each (sequence, k); the sequence's block table must already cover
        its positions up to num_tokens + k - 1 (the scheduler allocates them first). A sequence whose
        catch-up does not fit this call's ``max_catch_up_tokens`` gets [] (it continues next call)."""
        out: list[list[int]] = [[] for _ in plans]
        budget = self.max_catch_up_tokens
        entries = []  # (plan index, start, tokens, sample)
        for i, (seq, k) in enumerate(plans):
            n = seq.num_tokens
            start = self.valid_prefix(seq)
            take = min(n - start, budget)
            if take <= 0:
                continue
            budget -= take
            entries.append((i, start, seq.token_ids[start:start + take], 1 if start + take == n else 0))
        if not entries:
            return out
        entries.sort(key=lambda e: len(e[2]) != 1)  # single-token entries first, as the runner's layout wants
        step = StepInput([e[2] for e in entries], [e[1] for e in entries], [e[3] for e in entries],
                         [plans[e[0]][0].block_table for e in entries])
        rows, logits = self.runner.run(step)
        self.steps += 1
        first = logits.argmax(-1).tolist() if rows else []
        # the sequences that reached their last token draft on; the others only caught up
        live: list[tuple[int, int]] = []  # (plan index, latest draft)
        for row, token in zip(rows, first):
            live.append((entries[row][0], token))
        for idx, start, tokens, _ in entries:
            seq = plans[idx][0]
            end = start + len(tokens)
            self.catch_up_tokens += len(tokens)
            self._label(seq, start, end)
            seq.draft_progress = DraftProgress(end, [], seq.num_preemptions)
        for idx, token in live:
            out[idx].append(token)
        # k - 1 more tokens, one batched decode step each, for the sequences that want them
        j = 1
        while True:
            live = [(idx, out[idx][-1]) for idx, _ in live if len(out[idx]) < plans[idx][1]]
            if not live:
                break
            seqs = [plans[idx][0] for idx, _ in live]
            positions = [seq.num_tokens + j - 1 for seq in seqs]
            step = StepInput([[token] for _, token in live], positions, [1] * len(live),
                             [seq.block_table for seq in seqs])
            _, logits = self.runner.run(step)
            self.steps += 1
            for (idx, token), seq, pos, nxt in zip(live, seqs, positions, logits.argmax(-1).tolist()):
                self._unlabel(seq, pos, pos + 1)
                seq.draft_progress.drafts.append(token)
                out[idx].append(nxt)
            j += 1
        return out
