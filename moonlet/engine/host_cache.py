"""The host-memory tier of the prefix cache (hierarchical KV cache).

The device pool keeps cached (full, hashed) blocks until it needs their space, least recently freed
first; without this tier an evicted block's content is lost and the next prompt that starts with it
recomputes it. With ``EngineConfig.host_cache_memory`` set, an evicted block's latent rows (every
latent layer, and for MoBA models the block's per-page sums) are first copied to a block of a second
pool in host memory, and its hash is kept in ``HostBlockIndex`` (LRU; when full, the least recently
used host block is reused). A later prompt whose prefix chain continues into hashes held only there
gets fresh device blocks, which the step copies back before its forward: those tokens count as
computed (a prefix-cache hit), nothing is recomputed.

Two parts, as for the device cache:

- ``HostBlockIndex`` (bookkeeping, owned by ``cache.KVCacheManager``): hash -> host block, the LRU,
  and the host blocks a step reads (pinned for the step, so no eviction in the same step overwrites
  them before the copy).
- ``HostCachePool`` (storage, owned by the runner): ``data`` [host_blocks, layers, block_size,
  latent_dim] in the device pool's dtype (block-major, so one block is one contiguous range), ``scales``
  [host_blocks, layers, block_size, 2] float32 when that pool is FP8 (its per-entry scales), ``sums``
  [host_blocks, MoBA layers, latent_dim] float32 when the model has MoBA layers; pinned memory when
  the device is CUDA. ``swap_out`` / ``swap_in`` execute a step's copy lists
  (``ScheduledBatch.swap_out`` / ``swap_in``).

Ordering inside a step (what keeps every sequence's cache intact): the scheduler decides evictions
and swap-ins while it builds the step, and the runner runs all swap-outs, then all swap-ins, then the
forward. A device block evicted and reused in the same step is copied out before anything writes it;
a swap-in's destination is written before the forward reads it; a host block a swap-in reads is
pinned for the step, so no swap-out of the same step can overwrite it; a host block written by a
swap-out of the step and read by a swap-in of the same step is read after the copy completes (CUDA:
the host side waits for the copy's event first). All copies run on the current stream, in order with
the forwards.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .cache import LatentCachePool
from .kv_quant import NUM_SCALES, entry_bytes, is_fp8


class HostBlockIndex:
    """Which host block holds which block hash: an LRU over ``capacity`` host blocks (bookkeeping only)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"need a host cache capacity >= 1 block; got {capacity}")
        self.capacity = capacity
        self.block_of: OrderedDict[bytes, int] = OrderedDict()  # LRU: first = reused first
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._pinned: dict[int, int] = {}  # host block -> swap-ins reading it this step
        self.num_evicted = 0  # hashes dropped from the host tier to make room

    def __len__(self) -> int:
        return len(self.block_of)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self.block_of

    def get(self, digest: bytes) -> int | None:
        """The host block holding ``digest``, marked recently used (None if the tier lacks it)."""
        block = self.block_of.get(digest)
        if block is not None:
            self.block_of.move_to_end(digest)
        return block

    def store(self, digest: bytes) -> int | None:
        """A host block for new content named ``digest``: a free one, else the least recently used
        block that no swap-in of this step reads (its old hash is forgotten). None when every block
        is pinned. The caller copies the content in (a swap-out)."""
        if self._free:
            block = self._free.pop()
        else:
            victim = next((d for d, b in self.block_of.items() if b not in self._pinned), None)
            if victim is None:
                return None
            block = self.block_of.pop(victim)
            self.num_evicted += 1
        self.block_of[digest] = block
        return block

    def pin(self, block: int) -> None:
        """A swap-in of this step reads ``block``: keep it until the step's copies have run."""
        self._pinned[block] = self._pinned.get(block, 0) + 1

    def unpin(self, block: int) -> None:
        n = self._pinned[block] - 1
        if n:
            self._pinned[block] = n
        else:
            del self._pinned[block]

    def unpin_all(self) -> None:
        """The step's copies are decided and will run before anything else touches the tier."""
        self._pinned.clear()


class HostCachePool:
    """Host copies of evicted device blocks: ``data`` [num_blocks, layers, block_size, latent_dim] in
    the device pool's dtype, ``scales`` [num_blocks, layers, block_size, 2] float32 for an FP8 pool's
    scales (None otherwise), and ``sums`` [num_blocks, MoBA layers, latent_dim] float32 for the per-page
    sums of MoBA models (None otherwise). FP8 bytes are moved as uint8 (the CPU has no float8 copy
    kernels for indexed writes). ``pin_memory``: page-locked memory (CUDA), so the copies
    are true asynchronous DMA transfers on the stream."""

    def __init__(self, device_pool: LatentCachePool, num_blocks: int, num_sum_layers: int = 0,
                 pin_memory: bool = False):
        if num_blocks < 1:
            raise ValueError(f"need a host cache of at least one block; got {num_blocks}")
        p = device_pool
        self.num_blocks = num_blocks
        self.pinned = pin_memory
        # torch.empty: pageable memory is only touched when written (a host block is never read before
        # a swap-out wrote it); pinned memory is locked when allocated
        self.data = torch.empty(num_blocks, p.num_layers, p.block_size, p.latent_dim, dtype=p.data.dtype,
                                pin_memory=pin_memory)
        self.scales = torch.empty(num_blocks, p.num_layers, p.block_size, NUM_SCALES, dtype=torch.float32,
                                  pin_memory=pin_memory) if p.scales is not None else None
        self.sums = torch.empty(num_blocks, num_sum_layers, p.latent_dim, dtype=torch.float32,
                                pin_memory=pin_memory) if num_sum_layers else None
        self._written: set[int] = set()  # host blocks written by copies that may still be in flight
        self._event = None  # CUDA event recorded after the latest swap-out

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, latent_dim: int, dtype: torch.dtype,
                        num_sum_layers: int = 0) -> int:
        """``dtype``: the device pool's (an FP8 pool's scales included)."""
        return num_layers * block_size * entry_bytes(latent_dim, dtype) + num_sum_layers * latent_dim * 4

    @property
    def nbytes(self) -> int:
        total = self.data.numel() * self.data.element_size()
        total += self.scales.numel() * 4 if self.scales is not None else 0
        return total + (self.sums.numel() * 4 if self.sums is not None else 0)

    def swap_out(self, pairs: list[tuple[int, int]], pool: LatentCachePool, sums: torch.Tensor | None = None) -> None:
        """Copy device blocks to host blocks: ``pairs`` of (device block, host block); ``sums``: the
        device's per-page sums [MoBA layers, pages, D] (MoBA models). A host block named twice keeps
        the last copy (the earlier content was evicted from the tier within the step, unread)."""
        last = {h: d for d, h in pairs}
        if not last:
            return
        host = list(last)
        dev = torch.tensor(list(last.values()), dtype=torch.long, device=pool.data.device)
        # (host tensor, device tensor [layers or MoBA layers, blocks, ...]) pairs that move together
        pairs = [(self._bytes(self.data), self._bytes(pool.data))]
        if self.scales is not None:
            pairs.append((self.scales, pool.scales))
        if self.sums is not None:
            pairs.append((self.sums, sums))
        moved = [(dst, src.index_select(1, dev).transpose(0, 1)) for dst, src in pairs]  # [n, layers, ...]
        if pool.data.device.type == "cuda":
            # one asynchronous copy per block straight into its (contiguous, pinned) host block
            for dst, rows in moved:
                rows = rows.contiguous()
                for i, h in enumerate(host):
                    dst[h].copy_(rows[i], non_blocking=self.pinned)
            self._written.update(host)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            index = torch.tensor(host, dtype=torch.long)
            for dst, rows in moved:
                dst.index_copy_(0, index, rows.cpu())

    def swap_in(self, pairs: list[tuple[int, int]], pool: LatentCachePool, sums: torch.Tensor | None = None) -> None:
        """Copy host blocks into device blocks: ``pairs`` of (host block, device block)."""
        if not pairs:
            return
        host = [h for h, _ in pairs]
        if self._written and self._event.query():  # every swap-out so far has landed
            self._written.clear()
        if self._written and not self._written.isdisjoint(host):
            self._event.synchronize()  # a swap-out into one of these blocks may still be in flight
            self._written.clear()
        device = pool.data.device
        index = torch.tensor(host, dtype=torch.long)
        dev = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)
        self._bytes(pool.data).index_copy_(1, dev, self._gather(self._bytes(self.data), index, device).transpose(0, 1))
        if self.scales is not None:
            pool.scales.index_copy_(1, dev, self._gather(self.scales, index, device).transpose(0, 1))
        if self.sums is not None:
            sums.index_copy_(1, dev, self._gather(self.sums, index, device).transpose(0, 1))

    @staticmethod
    def _bytes(t: torch.Tensor) -> torch.Tensor:
        """An FP8 tensor as uint8 (same bytes; indexed copies exist for it), others as they are."""
        return t.view(torch.uint8) if is_fp8(t.dtype) else t

    def _gather(self, src: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``src[index]`` on ``device``: through a pinned staging buffer when pinned (PyTorch's caching
        host allocator keeps the buffer until the asynchronous copy out of it is done)."""
        if not self.pinned:
            return src.index_select(0, index).to(device)
        staging = torch.empty((len(index),) + tuple(src.shape[1:]), dtype=src.dtype, pin_memory=True)
        torch.index_select(src, 0, index, out=staging)
        return staging.to(device, non_blocking=True)

    def synchronize(self) -> None:
        """Wait for the swap-outs in flight (reading ``data`` on the host, e.g. in tests)."""
        if self._event is not None:
            self._event.synchronize()
        self._written.clear()
