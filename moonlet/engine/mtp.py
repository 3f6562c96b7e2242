"""Speculative decoding with the checkpoint's own MTP layer (``speculative="mtp"``; DeepSeek-V3).

The MTP layer (``moonlet.model.mtp``) predicts the token after next from the main model's hidden
state at a position and the token that follows it. It keeps its own paged latent cache on the
target's block ids (as a draft model does, ``draft.py``), and it runs at the end of every engine
step over exactly the positions the target computed in that step (prompt chunks, decodes, and the
accepted part of verification spans), with their hidden states, which the target's runner keeps
(``ModelRunner.keep_hidden``). So every block the target has computed also holds the MTP layer's
latents, and a prefix-cache hit needs nothing more (blocks copied back from the host tier would not:
the host tier is refused with MTP).

Drafts come right after that catch-up, for each sequence whose known tokens are now all computed
but the last: the first from the MTP logits at its last computed position; for ``k`` > 1 the layer
runs again on its own output with the draft it just made (as DeepSeek-V3's MTP module is chained),
one batched single-token step per further draft, which writes MTP latents past the computed
tokens that the next catch-up overwrites. The scheduler takes them with ``propose(seq)`` at the next
step, and the target verifies them (``Sampler.verify``), so the output is the target's whatever the
MTP layer says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .runner import StepInput
from .spec import SpeculativeConfig, max_drafts

if TYPE_CHECKING:
    from .cache import KVCacheManager
    from .runner import ModelRunner
    from .sequence import Sequence


def build_mtp_runner(drafter, rc) -> "ModelRunner":
    """A ``ModelRunner`` over an ``MTPDrafter`` and its latent pool (its MTP layer ids, the engine's
    block count, block size and cache dtype); it keeps its hidden states (chained drafts need them)."""
    from .cache import LatentCachePool
    from .runner import ModelRunner

    config = drafter.config
    layer = drafter.layer.layer_idx
    pool = LatentCachePool(layer + 1, rc.num_blocks, rc.block_size, config.latent_dim,
                           dtype=rc.kv_cache_dtype or drafter.dtype, device=drafter.device, layer_ids=[layer],
                           kv_lora=config.kv_lora_rank)
    runner = ModelRunner(drafter, pool, expanded_prefill=rc.expanded_prefill, triton_decode=rc.triton_decode)
    runner.keep_hidden = True
    return runner


class MTPProposer:
    """Drafts from the MTP layer: ``observe`` after every step (catch-up, then drafts), ``propose``
    for the scheduler (the drafts made for the sequence's current tokens)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, runner: "ModelRunner",
                 cache: "KVCacheManager"):
        self.config = config
        self.max_model_len = max_model_len
        self.runner = runner
        self.cache = cache
        self.steps = 0  # MTP forwards
        self.catch_up_tokens = 0  # positions the catch-up forwards computed

    def max_drafts(self, seq: "Sequence") -> int:
        return max_drafts(self.config, seq, self.max_model_len)

    def propose(self, seq: "Sequence") -> list[int]:
        made = seq.mtp_drafts
        if made is None or made[0] != seq.num_tokens:  # made for other tokens (e.g. before an abort)
            return []
        return made[1][:self.max_drafts(seq)]

    @torch.inference_mode()
    def observe(self, seqs: list["Sequence"], target: "ModelRunner") -> None:
        """After a step of the target over ``seqs`` (the batch's sequences, in its order, with their
        computed counts already updated): run the MTP layer over the positions the step computed,
        then draft for the sequences that decode next."""
        step, hidden = target.last_step, target.last_hidden
        if step is None or hidden is None or not seqs:
            return
        entries = []  # (sequence, first position, count, flat row of its first hidden state)
        flat = 0
        for seq, start, tokens in zip(seqs, step.starts, step.tokens):
            count = min(seq.num_computed_tokens - start, len(tokens), seq.num_tokens - 1 - start)
            if count > 0:
                entries.append((seq, start, count, flat))
            flat += len(tokens)
        target.last_hidden = target.last_step = None
        if not entries:
            return
        entries.sort(key=lambda e: e[2] != 1)  # single-token entries first, as the runner's layout wants
        drafting = [e[0].finish_reason is None and e[0].num_computed_tokens == e[0].num_tokens - 1
                    and self.max_drafts(e[0]) > 0 for e in entries]
        rows = torch.cat([hidden[f:f + n] for _, _, n, f in entries])
        catch_up = StepInput([seq.token_ids[s + 1:s + 1 + n] for seq, s, n, _ in entries], [s for _, s, _, _ in entries],
                             [1 if d else 0 for d in drafting], [seq.block_table for seq, _, _, _ in entries],
                             inputs_embeds=rows)
        sampled, logits = self.runner.run(catch_up)
        self.steps += 1
        self.catch_up_tokens += sum(n for _, _, n, _ in entries)
        if not sampled:
            return
        out_hidden = self.runner.last_hidden
        # per drafting sequence: its drafts so far and the MTP output row of its last position
        ends = []
        pos = 0
        for _, _, n, _ in entries:
            ends.append(pos + n - 1)
            pos += n
        live = []
        for i, token in zip(sampled, logits.argmax(-1).tolist()):
            seq = entries[i][0]
            seq.mtp_drafts = (seq.num_tokens, [token])
            live.append((seq, out_hidden[ends[i]]))
        want = self.config.num_speculative_tokens
        bs = self.cache.block_size
        for j in range(2, want + 1):
            # chain step j at position n - 3 + j: needs its slot in the sequence's table
            live = [(seq, h) for seq, h in live if len(seq.mtp_drafts[1]) == j - 1 and self.max_drafts(seq) >= j
                    and (len(seq.block_table) * bs > seq.num_tokens - 3 + j
                         or self.cache.allocate(seq, j - 1))]
            if not live:
                break
            chain = StepInput([[seq.mtp_drafts[1][-1]] for seq, _ in live],
                              [seq.num_tokens - 3 + j for seq, _ in live], [1] * len(live),
                              [seq.block_table for seq, _ in live], inputs_embeds=torch.stack([h for _, h in live]))
            _, logits = self.runner.run(chain)
            self.steps += 1
            out_hidden = self.runner.last_hidden
            for r, ((seq, _), token) in enumerate(zip(live, logits.argmax(-1).tolist())):
                seq.mtp_drafts[1].append(token)
                live[r] = (seq, out_hidden[r])
