"""Token datasets on disk and a deterministic, resumable packing loader.

A dataset directory holds binary token shards and, per shard, a loss-mask file:
    meta.json                 {"dtype": "uint16"|"uint32", "vocab_size", "shards": [...], ...}
    tokens-00000.bin          raw token ids (little-endian, dtype above)
    mask-00000.bin            uint8, 1 = this token is a training target (e.g. assistant tokens)
    docs-00000.bin            uint64 document start offsets within the shard
Documents never cross shards. The loader chunks documents longer than a row, shuffles them per
epoch with a seeded permutation and packs whole documents greedily into rows of seq_len + 1
tokens (the rest of a row is padding with mask 0). Its state is (epoch, cursor), so a run resumes
exactly where it stopped; under data parallelism every rank packs the same global batch and keeps
its own slice of rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

META_NAME = "meta.json"


def write_dataset(docs: Iterable[tuple[list[int], list[int] | None]], directory: str | os.PathLike, vocab_size: int,
                  shard_tokens: int = 1 << 24, info: dict | None = None) -> Path:
    """Write documents (token ids, per-token loss mask or None for all ones) as token shards.

    Returns the directory. ``info`` is stored in meta.json (e.g. what the data is and how it was made).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    shards: list[dict] = []
    tokens: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    starts: list[int] = []
    used = 0

    def flush() -> None:
        nonlocal tokens, masks, starts, used
        if not tokens:
            return
        i = len(shards)
        names = {k: f"{k}-{i:05d}.bin" for k in ("tokens", "mask", "docs")}
        np.concatenate(tokens).astype(dtype).tofile(directory / names["tokens"])
        np.concatenate(masks).astype(np.uint8).tofile(directory / names["mask"])
        np.asarray(starts, dtype=np.uint64).tofile(directory / names["docs"])
        shards.append({**names, "num_tokens": used, "num_docs": len(starts)})
        tokens, masks, starts, used = [], [], [], 0

    for ids, mask in docs:
        if not ids:
            continue
        arr = np.asarray(ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"token id out of range [0, {vocab_size}) in a document: min {arr.min()}, max {arr.max()}")
        m = np.ones(len(arr), np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8)
        if len(m) != len(arr):
            raise ValueError(f"loss mask has {len(m)} entries for {len(arr)} tokens")
        if used and used + len(arr) > shard_tokens:
            flush()
        starts.append(used)
        tokens.append(arr)
        masks.append(m)
        used += len(arr)
    flush()
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "shards": shards,
            "num_tokens": sum(s["num_tokens"] for s in shards), "num_docs": sum(s["num_docs"] for s in shards),
            "info": info or {}}
    (directory / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


class TokenDataset:
    """Memory-mapped view of a dataset directory written by :func:`write_dataset`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"no {META_NAME} in {self.directory}; build the dataset first "
                                    "(moonlet.train.data.write_dataset or the recipe's data step)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(self.meta["dtype"])
        self.tokens, self.masks, docs = [], [], []
        for s, shard in enumerate(self.meta["shards"]):
            self.tokens.append(np.memmap(self.directory / shard["tokens"], dtype=dtype, mode="r"))
            self.masks.append(np.memmap(self.directory / shard["mask"], dtype=np.uint8, mode="r"))
            starts = np.fromfile(self.directory / shard["docs"], dtype=np.uint64).astype(np.int64)
            ends = np.append(starts[1:], shard["num_tokens"])
            docs.extend((s, int(a), int(b)) for a, b in zip(starts, ends))
        self.docs = docs  # (shard, start, end)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, a, b = self.docs[i]
        return self.tokens[s][a:b], self.masks[s][a:b]


class PackedLoader:
    """Deterministic batches of packed rows: ``next_batch()`` -> (inputs [b, T], targets [b, T],
    loss_mask [b, T] float) for this rank's ``rows_per_rank`` rows of a global batch of
    ``batch_size`` rows. ``state_dict()``/``load_state_dict()`` resume exactly.

    ``document_mask``: keep the packed pieces apart. Each batch then also has ``segments`` [b, T]
    (the piece each input token belongs to, numbered in its row; padding -1) and ``positions`` [b, T]
    (restarting at 0 at each piece), for an attention mask that stops a token attending to another
    piece; and a target that lies in the next piece (the last token of a piece predicting the first of
    the next) is not counted. Without it, pieces are packed back to back under one causal mask, as in
    pretraining."""

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad_id: int = 0, document_mask: bool = False):
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
        self.ds, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.pad_id = seed, rank, world_size, pad_id
        self.document_mask = document_mask
        row = seq_len + 1
        # Split long documents into row-sized pieces once; the pieces are what gets shuffled.
        self.pieces: list[tuple[int, int, int]] = []
        for s, a, b in dataset.docs:
            for start in range(a, b, row):
                if min(start + row, b) - start >= 2:  # a 1-token piece predicts nothing
                    self.pieces.append((s, start, min(start + row, b)))
        if not self.pieces:
            raise ValueError(f"dataset {dataset.directory} has no document of 2 or more tokens")
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))

    def _next_piece(self) -> tuple[int, int, int]:
        if self.cursor >= len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        return self.pieces[self._order[self.cursor]]

    def _row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        row = self.seq_len + 1
        toks = np.full(row, self.pad_id, dtype=np.int64)
        mask = np.zeros(row, dtype=np.uint8)
        seg = np.full(row, -1, dtype=np.int64)
        used = 0
        while True:
            s, a, b = self._next_piece()
            n = b - a
            if used + n > row:
                break  # this piece starts the next row
            toks[used:used + n] = self.ds.tokens[s][a:b]
            mask[used:used + n] = self.ds.masks[s][a:b]
            seg[used:used + n] = seg[used - 1] + 1 if used else 0
            used += n
            self.cursor += 1
        return toks, mask, seg

    def next_batch(self) -> dict[str, torch.Tensor | int]:
        """This rank's rows of the next global batch: ``inputs``/``targets`` [b, T] int64, ``mask`` [b, T]
        float (1 = count this target in the loss) and ``global_targets``, the number of counted targets
        over the whole global batch (so every rank can normalize the loss the same way); with
        ``document_mask`` also ``segments`` and ``positions`` [b, T] int64."""
        rows = [self._row() for _ in range(self.batch_size)]
        per = self.batch_size // self.world_size
        toks = torch.from_numpy(np.stack([r[0] for r in rows]))
        mask = torch.from_numpy(np.stack([r[1] for r in rows]))[:, 1:]  # the target of position j is token j+1
        mine = slice(self.rank * per, (self.rank + 1) * per)
        out = {"inputs": toks[mine, :-1], "targets": toks[mine, 1:]}
        if self.document_mask:
            seg = torch.from_numpy(np.stack([r[2] for r in rows]))
            mask = mask * (seg[:, :-1] == seg[:, 1:])  # a target in the next piece is not this piece's
            out["segments"] = seg[mine, :-1]
            out["positions"] = _positions_in_segments(seg[mine, :-1])
        out.update(mask=mask[mine].float(), global_targets=int(mask.sum()))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_pieces": len(self.pieces)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_pieces") != len(self.pieces) or state.get("seed") != self.seed:
            raise ValueError(
                f"loader state is for a different dataset or seed (pieces {state.get('num_pieces')} vs "
                f"{len(self.pieces)}, seed {state.get('seed')} vs {self.seed}); resume with the same data and seq_len"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def _positions_in_segments(seg: torch.Tensor) -> torch.Tensor:
    """[b, T] segment ids (runs of equal values) -> each token's position in its run, from 0."""
    T = seg.shape[1]
    idx = torch.arange(T).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # index where each run began
    return idx - first
