"""Runs one scheduled batch through the model: flattens it, builds the paged-attention layout,
and returns next-token logits for the sequences whose known tokens are now all computed (and, for
a sequence verifying speculative drafts, for each of its drafts too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import BatchLayout, PagedLatentKV, PrefillSpan
from .cache import LatentCachePool
from .moba import MobaSpec
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class StepInput:
    """One step's forward in plain data: per entry (a sequence of the batch, decodes first) the tokens
    it computes from position ``starts[i]`` on, how many rows of it to sample (0: a partial prompt
    chunk; 1: its last token; 1 + drafts: a verification span), its block table and, for models with
    KDA layers, its recurrent-state slot; the step's state loads and snapshots; and the image feature
    rows that replace placeholder embeddings (flat index [n], features [n, hidden]) or None."""

    tokens: list[list[int]]
    starts: list[int]
    sample: list[int]
    block_tables: list[list[int]]
    state_slots: list[int] | None = None
    state_inits: list = field(default_factory=list)
    state_saves: list = field(default_factory=list)
    image_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    # host tier of the prefix cache: (device block, host block) copies out, then (host block, device
    # block) copies in, before the forward (ScheduledBatch.swap_out / swap_in)
    swap_out: list = field(default_factory=list)
    swap_in: list = field(default_factory=list)
    # models with KDA layers and speculative decoding: (source row, destination row) state copies that
    # run first (ScheduledBatch.state_copies)
    state_copies: list = field(default_factory=list)
    # the MTP drafter's steps: per token, the hidden state it is combined with ([N, hidden], flat order)
    inputs_embeds: torch.Tensor | None = None
    # disk tier: (block content read from disk, device block) copies in, after the host tier's
    # (ScheduledBatch.disk_in)
    disk_in: list = field(default_factory=list)
    # multi-LoRA serving: per entry, the resident slot of its adapter (-1: the base model); None when the
    # engine serves no adapters
    lora_slots: list[int] | None = None
    # prompt logprobs (SamplingParams.prompt_logprobs): (entry, first row of its chunk, k, the prompt tokens
    # those rows predict) — the LM head also runs on those rows (ModelRunner.prompt_logprobs)
    prompt_logprobs: list = field(default_factory=list)


PROMPT_LOGPROB_ROWS = 256  # rows per LM-head call for prompt logprobs (bounds the [rows, vocab] logits)


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
        self.workers = None  # tensor parallelism: moonlet.engine.parallel.Workers, sent every step
        self.host = None  # HostCachePool: the host tier of the prefix cache (host_cache_memory), or None
        self.disk = None  # disk_cache.DiskBlockStore: the disk tier (disk_cache_dir), or None
        # MTP speculative decoding: keep each step's hidden states of all its tokens (last_hidden [N, H],
        # with last_step, the StepInput they belong to); such steps never replay decode graphs
        self.keep_hidden = False
        self.last_hidden: torch.Tensor | None = None
        self.last_step: StepInput | None = None
        self.lora = None  # moonlet.engine.lora.MultiLora (multi-LoRA serving), or None
        # the last step's prompt logprobs: entry -> (first row of its chunk, token logprobs, ranks,
        # top-k values, top-k ids), lists per row (see StepInput.prompt_logprobs)
        self.prompt_logprobs: dict[int, tuple] = {}

    def enable_decode_graphs(self, scratch_block: int, max_model_len: int, batch_sizes, capture: bool) -> None:
        """Serve decode-only steps from ``DecodeGraphs`` (``capture=False``: its static buffers, run eagerly)."""
        from .cuda_graph import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.kv, scratch_block, -(-max_model_len // self.block_size),
                                   batch_sizes, capture=capture, lora=self.lora)

    def prepare(self, batch: ScheduledBatch) -> StepInput:
        """The step's forward in plain data (what tensor-parallel workers receive)."""
        tokens, starts, sample, prompt_lps = [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            drafts = batch.draft_tokens.get(seq)
            plp = getattr(seq, "prompt_logprobs", None)
            if plp is not None and not plp.complete and not drafts:
                # rows predicting the prompt tokens not recorded yet: token p + 1 from position p
                lo, hi = max(start, len(plp.logprobs) - 1), min(start + n, seq.num_prompt_tokens - 1)
                if hi > lo:
                    prompt_lps.append((i, lo - start, plp.k, seq.token_ids[lo + 1:hi + 1]))
            if drafts:
                assert n == 1 + len(drafts) and start + 1 == seq.num_tokens, "a verification span is 1 + drafts"
                tokens.append([seq.token_ids[start]] + list(drafts))
                sample.append(n)
            else:
                tokens.append(seq.token_ids[start:start + n])  # a slice: already a copy
                sample.append(1 if start + n == seq.num_tokens else 0)
            starts.append(start)
        slots = None if self.states is None else [s.state_slot for s in batch.seqs]
        image_rows = self.image_rows(batch)
        if image_rows is not None:
            image_rows = (image_rows[0].cpu(), image_rows[1].cpu()) if self.workers is not None else image_rows
        # block tables as they are (no per-step copy of long tables; sending to workers pickles them)
        lora_slots = None
        if self.lora is not None:
            lora_slots = [-1 if s.lora_slot is None else s.lora_slot for s in batch.seqs]
        return StepInput(tokens, starts, sample, [s.block_table for s in batch.seqs], slots,
                         list(batch.state_inits), list(batch.state_saves), image_rows,
                         list(getattr(batch, "swap_out", ())), list(getattr(batch, "swap_in", ())),
                         list(getattr(batch, "state_copies", ())), disk_in=list(getattr(batch, "disk_in", ())),
                         lora_slots=lora_slots, prompt_logprobs=prompt_lps)

    def build_layout(self, step: StepInput) -> tuple[torch.Tensor, BatchLayout, list[tuple[int, int]]]:
        """input_ids [1, N], the layout, and per entry (first flat index, count) of the rows to sample:
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
        for i, (new, start, count, table) in enumerate(zip(step.tokens, step.starts, step.sample, step.block_tables)):
            n, flat = len(new), len(ids)
            ids.extend(new)
            if count > 1:
                sample_at.append((flat, count))
            else:
                sample_at.append((flat + n - 1, 1) if count else (-1, 0))
            if n == 1:
                num_decodes += 1
                decode_pos.append(start)
                decode_tables.append(table)
            else:
                blocks = torch.tensor(table, dtype=torch.long)
                pos = torch.arange(start, start + n)
                prefills.append(PrefillSpan(flat, n, start + n, blocks.to(self.device),
                                            -1 if step.state_slots is None else step.state_slots[i]))
                pre_pos.append(pos)
                pre_slots.append(blocks[pos // bs] * bs + pos % bs)
        assert all(len(t) == 1 for t in step.tokens[:num_decodes]), "decodes must lead"

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
                state_slots = torch.tensor(step.state_slots[:num_decodes], device=self.device)
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
        (``batch.draft_tokens``). With tensor-parallel workers, they run the same step alongside."""
        step = self.prepare(batch)
        if self.workers is None:
            rows, logits = self.run(step)
        else:
            self.workers.send_step(step)
            try:
                rows, logits = self.run(step)
            except Exception as e:
                self.workers.failed(e)
                raise
        return [batch.seqs[i] for i in rows], logits

    @torch.inference_mode()
    def run(self, step: StepInput) -> tuple[list[int], torch.Tensor | None]:
        """Run a prepared step: (the entries sampled, their logits rows as ``execute`` describes)."""
        self.swap(step)
        self.prompt_logprobs = {}
        if not step.tokens:  # only host-tier copies this step
            if step.state_copies and self.states is not None:
                self.states.copy_rows(step.state_copies)
            return [], None
        if self.graphs is not None and not self.keep_hidden and step.inputs_embeds is None and \
                not step.prompt_logprobs and \
                all(len(t) == 1 for t in step.tokens) and \
                step.image_rows is None and self.graphs.can_run(len(step.tokens),
                                                                max(len(t) for t in step.block_tables)):
            return self._run_graph(step)
        input_ids, layout, sample_at = self.build_layout(step)
        inputs_embeds = None if step.inputs_embeds is None else step.inputs_embeds.to(self.device)[None]
        if step.image_rows is not None:  # image features over the placeholder tokens' embeddings
            index, features = step.image_rows
            inputs_embeds = self.model.model.embed_tokens(input_ids)
            inputs_embeds[0, index.to(self.device)] = features.to(device=self.device, dtype=inputs_embeds.dtype)
        if self.states is not None:  # load fresh / resumed slots, note the snapshots to take
            self.states.begin_step(step.state_inits, step.state_saves, step.state_slots[:layout.num_decodes],
                                   step.state_copies)
        self.kv.set_batch(layout)
        if self.lora is not None:
            self._set_lora(step)
        try:
            hidden = self.model.hidden_states(input_ids, positions=layout.positions[None], kv=self.kv,
                                              inputs_embeds=inputs_embeds)  # [1, N, H]
        finally:
            self.kv.set_batch(None)
            if self.lora is not None:
                self.lora.set_step(None)
            if self.states is not None:
                self.states.end_step()
        if self.keep_hidden:
            self.last_hidden, self.last_step = hidden[0], step
        if step.prompt_logprobs:
            self.prompt_logprobs = self._prompt_logprobs(hidden[0], step)
        rows = [i for i, (_, count) in enumerate(sample_at) if count]
        if not rows:
            return [], None
        flat = [first + j for first, count in sample_at for j in range(count)]
        index = torch.tensor(flat, device=self.device)
        logits = self.model.lm_head(hidden[0, index]).float()  # only the rows we sample from
        return rows, logits

    def _set_lora(self, step: StepInput) -> None:
        """Each flat token's adapter slot for the forward (entries in batch order, as the layout lays
        them out); no adapter token at all: the LoRA hooks stay off."""
        if step.lora_slots is None or all(s < 0 for s in step.lora_slots):
            self.lora.set_step(None)
            return
        per_token = [slot for slot, new in zip(step.lora_slots, step.tokens) for _ in new]
        self.lora.set_step(torch.tensor(per_token, dtype=torch.long, device=self.device), per_token)

    def _prompt_logprobs(self, hidden: torch.Tensor, step: StepInput) -> dict[int, tuple]:
        """The LM head over the rows ``step.prompt_logprobs`` names, in slices of PROMPT_LOGPROB_ROWS rows:
        per entry, each row's log-softmax at its prompt token, that token's rank (1 + the tokens more
        likely) and the top k. Every tensor-parallel rank runs the same LM-head calls (they gather)."""
        flat = [0]
        for t in step.tokens:
            flat.append(flat[-1] + len(t))
        out: dict[int, tuple] = {}
        for entry, offset, k, targets in step.prompt_logprobs:
            first = flat[entry] + offset
            lps, ranks, top_v, top_i = [], [], [], []
            for a in range(0, len(targets), PROMPT_LOGPROB_ROWS):
                b = min(a + PROMPT_LOGPROB_ROWS, len(targets))
                logp = self.model.lm_head(hidden[first + a:first + b]).float().log_softmax(dim=-1)
                target = torch.tensor(targets[a:b], device=logp.device)
                own = logp.gather(1, target[:, None])  # [rows, 1]
                lps += own[:, 0].tolist()
                ranks += ((logp > own).sum(dim=-1) + 1).tolist()
                if k:
                    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
                    top_v += values.tolist()
                    top_i += ids.tolist()
                else:
                    top_v += [[] for _ in range(b - a)]
                    top_i += [[] for _ in range(b - a)]
            out[entry] = (offset, lps, ranks, top_v, top_i)
        return out

    def swap(self, batch: ScheduledBatch | StepInput) -> None:
        """The step's host- and disk-tier copies, before anything in the step writes the pool: evicted
        blocks out to host memory (with their MoBA page sums), then host prefix hits into their new device
        blocks, then the blocks read from disk into theirs."""
        disk_in = getattr(batch, "disk_in", ())
        if not (batch.swap_out or batch.swap_in or disk_in):
            return
        sums = self.kv.page_sums.data if self.kv.page_sums is not None else None
        if self.host is not None:
            self.host.swap_out(batch.swap_out, self.pool, sums)
            self.host.swap_in(batch.swap_in, self.pool, sums)
        if disk_in:
            from .disk_cache import load_blocks

            load_blocks(self.pool, sums, disk_in)

    def save_to_disk(self, blocks: list[tuple[int, bytes]]) -> None:
        """Queue device blocks for the disk tier: ``blocks`` of (device block, hash), named after the step
        that just ran (``KVCacheManager.take_disk_writes``). Their content (and MoBA page sums) is copied
        out now, before a later step can reuse the blocks; the writer thread writes the files."""
        if self.disk is None or not blocks:
            return
        from .disk_cache import gather_blocks

        sums = self.kv.page_sums.data if self.kv.page_sums is not None else None
        contents, event = gather_blocks(self.pool, sums, [b for b, _ in blocks])
        for (_, digest), parts in zip(blocks, contents):
            self.disk.put(digest, parts, event)

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

    def _run_graph(self, step: StepInput) -> tuple[list[int], torch.Tensor | None]:
        if step.state_copies:
            self.states.copy_rows(step.state_copies)
        logits = self.graphs.run([t[0] for t in step.tokens], step.starts, step.block_tables, step.state_slots,
                                 step.state_inits, step.state_saves, lora_slots=step.lora_slots)
        self.graph_steps += 1
        rows = [i for i, count in enumerate(step.sample) if count]
        if not rows:
            return [], None
        if len(rows) < len(step.tokens):
            logits = logits[torch.tensor(rows, device=logits.device)]
        return rows, logits
