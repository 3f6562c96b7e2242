"""Runs one scheduled batch through the model: flattens it, builds the paged-attention layout,
and returns next-token logits for the sequences whose known tokens are now all computed (and, for
a sequence verifying speculative drafts, for each of its drafts too)."""

from __future__ import annotations

import torch

from .attention import BatchLayout, PagedLatentKV, PrefillSpan
from .cache import LatentCachePool
from .moba import MobaSpec
from .scheduler import ScheduledBatch
from .sequence import Sequence


class ModelRunner:
    """Owns the model and the latent pool. ``execute`` runs a ``ScheduledBatch`` as a single forward
    over [1, total_tokens] on the absorbed path."""

    def __init__(self, model: torch.nn.Module, pool: LatentCachePool, expanded_prefill: bool = False,
                 triton_decode: bool = False, states=None):
        self.model = model
        self.pool = pool
        self.block_size = pool.block_size
        self.device = model.device
        decode_kernel = None
        if triton_decode:
            from ..kernels.mla_decode import paged_decode_attention_triton as decode_kernel
        self.kv = PagedLatentKV(pool, model.config.kv_lora_rank, decode_kernel=decode_kernel,
                                expanded_prefill=expanded_prefill,
                                moba=MobaSpec.from_config(model.config, pool.block_size), states=states)
        self.states = states  # RecurrentStates (models with KDA layers) or None
        self.graphs = None
        self.graph_steps = 0  # decode steps served from the graphs (or their eager stand-in)
        self.host = None  # HostCachePool: the host tier of the prefix cache (host_cache_memory), or None

    def enable_decode_graphs(self, scratch_block: int, max_model_len: int, batch_sizes, capture: bool) -> None:
        """Serve decode-only steps from ``DecodeGraphs`` (``capture=False``: its static buffers, run eagerly)."""
        from .cuda_graph import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.kv, scratch_block, -(-max_model_len // self.block_size),
                                   batch_sizes, capture=capture)

    def build_layout(self, batch: ScheduledBatch) -> tuple[torch.Tensor, BatchLayout, list[tuple[int, int]]]:
        """input_ids [1, N], the layout, and per sequence (first flat index, count) of the rows to sample:
        its last token (count 1), its last token and each draft (1 + drafts) when it verifies drafts,
        none (count 0) when it only computed part of its prompt.

        A sequence verifying drafts computes its last known token followed by the drafts: a
        multi-token entry, so a causal span over its paged cache like a prefill chunk."""
        bs = self.block_size
        ids: list[int] = []
        sample_at: list[tuple[int, int]] = []
        num_decodes = 0
        decode_pos: list[int] = []
        decode_tables: list[list[int]] = []
        prefills: list[PrefillSpan] = []
        pre_pos: list[torch.Tensor] = []
        pre_slots: list[torch.Tensor] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            flat = len(ids)
            drafts = batch.draft_tokens.get(seq)
            if drafts:
                assert n == 1 + len(drafts) and start + 1 == seq.num_tokens, "a verification span is 1 + drafts"
                ids.append(seq.token_ids[start])
                ids.extend(drafts)
                sample_at.append((flat, n))
            else:
                ids.extend(seq.token_ids[start:start + n])
                sample_at.append((flat + n - 1, 1) if start + n == seq.num_tokens else (-1, 0))
            if n == 1:
                num_decodes += 1
                decode_pos.append(start)
                decode_tables.append(seq.block_table)
            else:
                blocks = torch.tensor(seq.block_table, dtype=torch.long)
                pos = torch.arange(start, start + n)
                prefills.append(PrefillSpan(flat, n, start + n, blocks.to(self.device),
                                            -1 if seq.state_slot is None else seq.state_slot))
                pre_pos.append(pos)
                pre_slots.append(blocks[pos // bs] * bs + pos % bs)
        assert num_decodes == 0 or all(n == 1 for n in batch.num_new_tokens[:num_decodes]), "decodes must lead"

        positions, slots = [], []
        tables = ctx = state_slots = None
        if num_decodes:
            width = max(len(t) for t in decode_tables)
            # padding: block 0 (finite values, masked out by the context length)
            padded = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long)
            dpos = torch.tensor(decode_pos, dtype=torch.long)
            positions.append(dpos)
            slots.append(padded[torch.arange(num_decodes), dpos // bs] * bs + dpos % bs)
            tables, ctx = padded.to(self.device), (dpos + 1).to(self.device)
            if self.states is not None:
                state_slots = torch.tensor([s.state_slot for s in batch.seqs[:num_decodes]], device=self.device)
        positions += pre_pos
        slots += pre_slots
        layout = BatchLayout(
            positions=torch.cat(positions).to(self.device), slot_mapping=torch.cat(slots).to(self.device),
            num_decodes=num_decodes, decode_block_tables=tables, decode_ctx_lens=ctx, prefills=prefills,
            decode_state_slots=state_slots,
        )
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return input_ids, layout, sample_at

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run the batch; returns the sequences to sample and their logits [rows, vocab] (float32): one row
        per sequence, in order, or ``1 + len(drafts)`` consecutive rows for a sequence verifying drafts
        (``batch.draft_tokens``)."""
        self.swap(batch)
        image_rows = self.image_rows(batch)
        if self.graphs is not None and batch.seqs and all(n == 1 for n in batch.num_new_tokens) and \
                image_rows is None and self.graphs.can_run(len(batch.seqs), max(len(s.block_table) for s in batch.seqs)):
            return self._execute_graph(batch)
        input_ids, layout, sample_at = self.build_layout(batch)
        inputs_embeds = None
        if image_rows is not None:  # image features over the placeholder tokens' embeddings
            index, features = image_rows
            inputs_embeds = self.model.model.embed_tokens(input_ids)
            inputs_embeds[0, index.to(self.device)] = features.to(inputs_embeds.dtype)
        if self.states is not None:  # load fresh / resumed slots, note the snapshots to take
            self.states.begin_step(batch.state_inits, batch.state_saves,
                                   [s.state_slot for s in batch.seqs[:layout.num_decodes]])
        self.kv.set_batch(layout)
        try:
            hidden = self.model.hidden_states(input_ids, positions=layout.positions[None], kv=self.kv,
                                              inputs_embeds=inputs_embeds)  # [1, N, H]
        finally:
            self.kv.set_batch(None)
            if self.states is not None:
                self.states.end_step()
        rows = [i for i, (_, count) in enumerate(sample_at) if count]
        if not rows:
            return [], None
        flat = [first + j for first, count in sample_at for j in range(count)]
        index = torch.tensor(flat, device=self.device)
        logits = self.model.lm_head(hidden[0, index]).float()  # only the rows we sample from
        return [batch.seqs[i] for i in rows], logits

    def swap(self, batch: ScheduledBatch) -> None:
        """The step's host-tier copies, before anything in the step writes the pool: evicted blocks out
        to host memory (with their MoBA page sums), then host prefix hits into their new device blocks."""
        if self.host is None or not (batch.swap_out or batch.swap_in):
            return
        sums = self.kv.page_sums.data if self.kv.page_sums is not None else None
        self.host.swap_out(batch.swap_out, self.pool, sums)
        self.host.swap_in(batch.swap_in, self.pool, sums)

    @staticmethod
    def image_rows(batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The flat batch rows that are image placeholder positions, and the feature rows that replace
        their embeddings (None when the batch computes no image token). Each sequence's entry covers its
        positions num_computed_tokens .. + n; a chunk may start or end inside an image."""
        index: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        flat = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            images = getattr(seq, "images", None)
            if images is not None:
                start = seq.num_computed_tokens
                for first, image, row, count in images.rows(start, start + n):
                    feats = images.features[image]
                    if feats is None:
                        raise RuntimeError(f"request {seq.request_id!r}: image {image} has no features for this "
                                           "step (the engine provides them before the forward)")
                    index.append(torch.arange(flat + first - start, flat + first - start + count))
                    features.append(feats[row:row + count])
            flat += n
        if not index:
            return None
        return torch.cat(index), torch.cat(features)

    def _execute_graph(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None]:
        seqs = batch.seqs
        starts = [s.num_computed_tokens for s in seqs]
        logits = self.graphs.run([s.token_ids[p] for s, p in zip(seqs, starts)], starts,
                                 [s.block_table for s in seqs],
                                 None if self.states is None else [s.state_slot for s in seqs],
                                 batch.state_inits, batch.state_saves)
        self.graph_steps += 1
        rows = [i for i, (s, p) in enumerate(zip(seqs, starts)) if p + 1 == s.num_tokens]
        if not rows:
            return [], None
        if len(rows) < len(seqs):
            logits = logits[torch.tensor(rows, device=logits.device)]
        return [seqs[i] for i in rows], logits
