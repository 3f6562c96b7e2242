"""Decode steps replayed from CUDA graphs.

A decode step is dozens of small kernels per layer; at small batch sizes launching them costs more
than running them. ``DecodeGraphs`` captures the whole decode forward (embedding, every layer, the
final norm and the LM head over each row) once per batch size in ``batch_sizes`` and replays it.

Everything the graph reads lives in static buffers sized for the largest batch: token ids,
positions, cache slots, block tables (as wide as ``max_model_len`` needs) and context lengths. A
batch of n sequences runs in the smallest captured size >= n; the padding rows decode a dummy token
into a scratch block that the cache manager never hands out (the pool has one extra block for it),
with a context of one token, so they cannot touch real sequences and stay finite.

Hybrid models (KDA layers, ``recurrent.RecurrentStates``): the KDA layers gather and scatter the
decodes' recurrent states through one more static buffer, the rows' state slots. Padding rows point
at the states' scratch row (no sequence or snapshot has it; zeroed at the start of every replay), so
their gathers and scatters touch nothing else. What a step does to the states besides the forward
runs outside the graph: loading slots (zeros for a sequence starting at token 0, a snapshot after a
prefix hit) before the replay, and copying slots into snapshot rows after it.

Multi-LoRA serving (``lora``, a ``moonlet.engine.lora.MultiLora``): the rows' adapter slots are one
more static buffer (-1 for base rows and padding); the graphs always run the LoRA hooks over it (a
batch without adapters adds zeros), and loading an adapter into a slot overwrites the stacked factors
in place, so the captured graphs read the new adapter.

The same code runs eagerly with ``capture=False`` (on CPU, say): that is how the padding and buffer
logic is tested against the engine's ordinary path without a GPU.
"""

from __future__ import annotations

import torch

from .attention import BatchLayout, PagedLatentKV

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv: PagedLatentKV, scratch_block: int, max_blocks: int,
                 batch_sizes=DEFAULT_BATCH_SIZES, capture: bool = True, lora=None):
        if not batch_sizes:
            raise ValueError("DecodeGraphs needs at least one batch size")
        self.model, self.kv = model, kv
        self.block_size = kv.pool.block_size
        self.scratch_block = scratch_block
        self.batch_sizes = sorted(set(int(b) for b in batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.capture = capture
        dev = model.device
        B = self.max_batch
        self.input_ids = torch.zeros(1, B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.slots = torch.full((B,), scratch_block * self.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((B, max_blocks), scratch_block, dtype=torch.long, device=dev)
        self.ctx_lens = torch.ones(B, dtype=torch.long, device=dev)
        self.states = kv.states  # RecurrentStates (hybrid models) or None
        self.state_slots = None
        if self.states is not None:
            if self.states.scratch_row is None:
                raise ValueError("DecodeGraphs for a model with KDA layers needs RecurrentStates(scratch_row=True): "
                                 "padding rows decode into that row")
            self.state_slots = torch.full((B,), self.states.scratch_row, dtype=torch.long, device=dev)
        self.lora = lora
        self.lora_slots = torch.full((B,), -1, dtype=torch.long, device=dev) if lora is not None else None
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mempool = None
        if capture:
            self._capture_all()

    # ---- running ---------------------------------------------------------------------------------
    def can_run(self, num_seqs: int, max_blocks_needed: int) -> bool:
        return num_seqs <= self.max_batch and max_blocks_needed <= self.tables.shape[1]

    def padded_size(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    def _layout(self, bs: int) -> BatchLayout:
        return BatchLayout(positions=self.positions[:bs], slot_mapping=self.slots[:bs], num_decodes=bs,
                           decode_block_tables=self.tables[:bs], decode_ctx_lens=self.ctx_lens[:bs], prefills=[],
                           decode_state_slots=None if self.state_slots is None else self.state_slots[:bs])

    def _forward(self, bs: int) -> torch.Tensor:
        if self.states is not None:
            self.states.clear_scratch()
        self.kv.set_batch(self._layout(bs))
        if self.lora is not None:
            self.lora.set_step(self.lora_slots[:bs])
        try:
            hidden = self.model.hidden_states(self.input_ids[:, :bs], positions=self.positions[None, :bs],
                                              kv=self.kv)
        finally:
            self.kv.set_batch(None)
            if self.lora is not None:
                self.lora.set_step(None)
        return self.model.lm_head(hidden[0]).float()  # [bs, vocab]

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
            state_slots: list[int] | None = None, state_inits=(), state_saves=(),
            lora_slots: list[int] | None = None) -> torch.Tensor:
        """One decode step for n sequences (token, its position, its block table) -> logits [n, vocab].

        Hybrid models also give each sequence's recurrent-state slot, the slots to load before the
        step (``ScheduledBatch.state_inits``) and the snapshots to take after it (``state_saves``)."""
        n = len(token_ids)
        if (self.states is not None) != (state_slots is not None):
            raise ValueError("DecodeGraphs.run: give state_slots exactly when the model has KDA layers "
                             f"({'it has' if self.states is not None else 'it has none'})")
        bs = self.padded_size(n)
        bsz = self.block_size
        width = self.tables.shape[1]
        ids = torch.tensor(token_ids, dtype=torch.long)
        pos = torch.tensor(positions, dtype=torch.long)
        table = torch.full((bs, width), self.scratch_block, dtype=torch.long)
        for i, t in enumerate(block_tables):
            table[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        slots = torch.full((bs,), self.scratch_block * bsz, dtype=torch.long)
        slots[:n] = table[torch.arange(n), pos // bsz] * bsz + pos % bsz
        ctx = torch.ones(bs, dtype=torch.long)
        ctx[:n] = pos + 1
        # one host-to-device copy per buffer; padding rows: token 0 at position 0 in the scratch block
        self.input_ids[0, :bs].zero_()
        self.input_ids[0, :n].copy_(ids, non_blocking=True)
        self.positions[:bs].zero_()
        self.positions[:n].copy_(pos, non_blocking=True)
        self.slots[:bs].copy_(slots, non_blocking=True)
        self.tables[:bs].copy_(table, non_blocking=True)
        self.ctx_lens[:bs].copy_(ctx, non_blocking=True)
        if self.lora_slots is not None:
            adapters = torch.full((bs,), -1, dtype=torch.long)
            if lora_slots is not None:
                adapters[:n] = torch.tensor(lora_slots, dtype=torch.long)
            self.lora_slots[:bs].copy_(adapters, non_blocking=True)
        if self.states is not None:
            rows = torch.full((bs,), self.states.scratch_row, dtype=torch.long)
            rows[:n] = torch.tensor(state_slots, dtype=torch.long)
            self.state_slots[:bs].copy_(rows, non_blocking=True)
            self.states.load(state_inits)
        if self.capture:
            self.graphs[bs].replay()
            logits = self.logits[bs][:n].clone()  # the next replay overwrites the static output
        else:
            logits = self._forward(bs)[:n]
        if self.states is not None:
            self.states.copy_to_snapshots(list(state_saves))
        return logits

    # ---- capture ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _capture_all(self) -> None:
        if not torch.cuda.is_available() or self.model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device; use capture=False elsewhere")
        # warm up on a side stream (lazy initialization, autotuning) before any capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(self.max_batch)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        # largest first, so the smaller graphs reuse its memory pool
        for bs in reversed(self.batch_sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                self.logits[bs] = self._forward(bs)
            if self.mempool is None:
                self.mempool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
