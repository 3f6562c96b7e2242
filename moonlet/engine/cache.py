"""The paged latent KV cache: one pre-allocated pool per layer, a block allocator, the prefix cache.

MLA caches one entry per token per layer: the normalized latent (kv_lora_rank values) followed by
the rotated k_pe (qk_rope_head_dim values), ``config.latent_dim`` values in all. Tokens live in
fixed-size blocks; a sequence owns a block table (list of block ids) covering its tokens in order.

Prefix caching: once a block is full, it is named by a hash of (parent block's hash, its tokens),
so equal hashes mean equal whole prefixes (a block holding image tokens also hashes the digests of
those images: equal placeholders with other pixels are other content). A later request whose prompt
starts with the same full blocks shares them (reference counts) instead of recomputing them. Blocks
nobody holds stay cached until the allocator needs them, least recently freed first. With a host
tier (``host_cache.py``) an evicted block's content moves to host memory first, and a later prefix
hit there copies it back instead of recomputing it. With a disk tier (``disk_cache.py``) every named
block is also written to a file, and a hit there (also after a restart) is read back into a fresh
device block.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .kv_quant import NUM_SCALES, entry_bytes, is_fp8, quantize_entries

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .sequence import Sequence


def block_hash(parent: bytes | None, tokens, extra: bytes | None = None) -> bytes:
    """Content hash of a full block given its parent's hash: collision-resistant, so a hit is exact.
    ``extra``: what else decides the block's content besides its tokens (the digests of the images
    whose placeholder tokens lie in it); None for text, whose hashes it leaves unchanged."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(b"|")
    h.update(",".join(map(str, tokens)).encode())
    if extra is not None:
        h.update(b"#image:")
        h.update(extra)
    return h.digest()


class LatentCachePool:
    """The cache storage: ``data`` [layers, num_blocks, block_size, latent_dim], one allocation.

    ``layer(i)`` is layer i's pool [num_blocks, block_size, latent_dim]; each entry is
    [normalized latent (kv_lora) | rotated k_pe (rope)]. Zero-initialized so that slots not yet
    written hold finite values (they are masked out, but NaN·0 would still poison a softmax).

    An FP8 pool (``dtype=torch.float8_e4m3fn``, ``kv_cache_dtype="fp8"``) also holds ``scales``
    [layers, num_blocks, block_size, 2] float32: per entry the latent's and the k_pe's scale
    (``kv_quant``); ``kv_lora`` says where the latent part ends. Otherwise ``scales`` is None.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, latent_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 layer_ids: list[int] | None = None, kv_lora: int | None = None):
        # layer_ids: the model layers that cache latents (hybrid models: the MLA layers only); default all
        self.layer_ids = list(range(num_layers)) if layer_ids is None else list(layer_ids)
        self._index = {layer: i for i, layer in enumerate(self.layer_ids)}
        self.num_layers, self.num_blocks = len(self.layer_ids), num_blocks
        self.block_size, self.latent_dim = block_size, latent_dim
        self.kv_lora = kv_lora
        self.data = torch.zeros(self.num_layers, num_blocks, block_size, latent_dim, dtype=dtype, device=device)
        self.scales = None
        if is_fp8(dtype):
            if kv_lora is None or not 0 < kv_lora < latent_dim:
                raise ValueError(f"an FP8 latent pool needs kv_lora (where the latent part of an entry ends) in "
                                 f"(0, {latent_dim}); got {kv_lora!r}")
            self.scales = torch.zeros(self.num_layers, num_blocks, block_size, NUM_SCALES, dtype=torch.float32,
                                      device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def layer(self, i: int) -> torch.Tensor:
        return self.data[self._index[i]]

    def layer_scales(self, i: int) -> torch.Tensor | None:
        """Layer i's scales [num_blocks, block_size, 2] (FP8 pools), else None."""
        return None if self.scales is None else self.scales[self._index[i]]

    def write(self, i: int, slots: torch.Tensor, entries: torch.Tensor) -> None:
        """Store ``entries`` [N, latent_dim] at flat ``slots`` [N] (block * block_size + offset) of layer i:
        cast to the pool's dtype, or quantized with their scales into an FP8 pool."""
        pool = self.layer(i).view(-1, self.latent_dim)
        if self.scales is None:
            pool.index_copy_(0, slots, entries.to(pool.dtype))
            return
        q, scales = quantize_entries(entries, self.kv_lora)
        pool.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))  # no float8 index_copy_ on the CPU
        self.layer_scales(i).view(-1, NUM_SCALES).index_copy_(0, slots, scales)

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.data.numel() * self.data.element_size() + scales


def latent_layer_ids(config: "ModelConfig") -> list[int]:
    """The layers that keep a latent cache: all but a hybrid model's KDA layers."""
    kda = set(config.kda_layer_ids)
    return [i for i in range(config.num_hidden_layers) if i not in kda]


def bytes_per_block(config: "ModelConfig", block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one pool block of ``dtype`` over every latent layer (an FP8 pool's scales included)."""
    return len(latent_layer_ids(config)) * block_size * entry_bytes(config.latent_dim, dtype)


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (free GPU memory; MemAvailable on CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def parse_bytes(value: int | float | str) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1.5G"`` or a plain number of bytes -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, mult = text, 1
    try:
        return int(float(number) * mult)
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a memory size; write e.g. 536870912, '512MiB' or '2GiB'") from None


@dataclass
class CacheCounters:
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (in either tier)
    host_cache_hits: int = 0  # of those, tokens whose blocks came from the host tier
    host_blocks_swapped_in: int = 0  # host -> device block copies
    host_blocks_swapped_out: int = 0  # device -> host block copies (evictions kept)
    disk_cache_hits: int = 0  # of prefix_cache_hits, tokens whose blocks were read from the disk tier
    disk_blocks_loaded: int = 0  # disk -> device block copies (of admitted sequences)


class BlockAllocator:
    """Block ids with reference counts, a hash -> block map and an LRU of free cached blocks.

    Free blocks are of two kinds: never-hashed (handed out first) and cached (hold a full block's
    content under its hash; reusable on a prefix hit, evicted oldest first when space runs out).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1; got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest id first
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: first = evicted first
        self.on_uncache = None  # called with a hash when its block's content is dropped (state snapshots)
        self.on_evict = None  # called with (block, hash) before allocate() reuses a cached block (host tier)

    @property
    def num_free(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    def allocate(self) -> int:
        """A free block for new content (drops its cached content if it had any)."""
        if self._free_plain:
            block = self._free_plain.pop()
        elif self._free_cached:
            block, _ = self._free_cached.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(block, self.hash_of[block])
            self._uncache(block)
        else:
            raise RuntimeError("no free KV cache block (the scheduler should have checked num_free)")
        self.ref_count[block] = 1
        return block

    def acquire_cached(self, block: int) -> None:
        """Take a reference to a block found by hash (it may be in use or sitting free in the LRU)."""
        if self.ref_count[block] == 0:
            del self._free_cached[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] < 0:
            raise RuntimeError(f"block {block} released more times than it was taken")
        if self.ref_count[block] == 0:
            if self.hash_of[block] is not None:
                self._free_cached[block] = None
            else:
                self._free_plain.append(block)

    def register(self, block: int, digest: bytes) -> None:
        """Name a full, written block by its content hash so later prompts can share it."""
        if not self.enable_prefix_caching or self.hash_of[block] is not None:
            return
        if digest in self.cached:  # an identical block is already cached; keep that one
            return
        self.hash_of[block] = digest
        self.cached[digest] = block

    def lookup(self, digest: bytes) -> int | None:
        return self.cached.get(digest) if self.enable_prefix_caching else None

    def forget(self, block: int) -> None:
        """Unname a block whose content will never be written (a swap-in that was called off); unlike
        an eviction this tells no one (the content still lives wherever it was to come from)."""
        digest = self.hash_of[block]
        if digest is not None:
            del self.cached[digest]
            self.hash_of[block] = None

    def _uncache(self, block: int) -> None:
        digest = self.hash_of[block]
        if digest is not None:
            del self.cached[digest]
            self.hash_of[block] = None
            if self.on_uncache is not None:
                self.on_uncache(digest)

    def reset_prefix_cache(self) -> None:
        """Forget every cached free block (blocks in use keep their content and hash)."""
        while self._free_cached:
            block, _ = self._free_cached.popitem(last=False)
            self._uncache(block)
            self._free_plain.append(block)


class StateSnapshots:
    """Which recurrent-state snapshot row holds the state after which prefix (bookkeeping only; the
    tensors are in ``recurrent.RecurrentStates``).

    A snapshot is the KDA layers' state of some sequence right after a block boundary, named by the
    hash of the block ending there: the hash chain names the whole prefix, so the state is exactly
    the one any sequence starting with those tokens has there. Rows are reused least recently used
    first. Writing a snapshot takes two steps: ``reserve`` picks a row when a step is scheduled (the
    forward writes it), ``commit`` names it after the step, once its blocks are registered too.
    Snapshots are copies: they hold no reference on blocks. A snapshot whose last block leaves the
    prefix cache is dropped (``drop``): without its blocks' latents it cannot serve a hit.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"need a snapshot capacity >= 0; got {capacity}")
        self.capacity = capacity
        self.row_of: OrderedDict[bytes, int] = OrderedDict()  # LRU: first = reused first
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._pending: dict[bytes, int] = {}  # reserved this step, written by the forward, not yet named
        self.num_saved = 0  # snapshots written (committed), for stats
        self.num_restored = 0  # snapshots copied into a sequence's slot on a prefix hit
        self.num_branch_saved = 0  # of num_saved, those taken at a branch point (``KVCacheManager.match_prefix``)

    def __len__(self) -> int:
        return len(self.row_of)

    def has(self, digest: bytes) -> bool:
        return digest in self.row_of or digest in self._pending

    def get(self, digest: bytes) -> int | None:
        """The row holding the state after the prefix named ``digest``, marked recently used."""
        row = self.row_of.get(digest)
        if row is not None:
            self.row_of.move_to_end(digest)
        return row

    def reserve(self, digest: bytes, replace: bytes | None = None) -> int | None:
        """A row for a new snapshot named ``digest``: the row of snapshot ``replace`` when it is still
        held (a sequence's previous output snapshot, now superseded), else a free row, else the least
        recently used one. None when every row is already reserved by this step."""
        if replace is not None and replace in self.row_of:
            row = self.row_of.pop(replace)
        elif self._free:
            row = self._free.pop()
        elif self.row_of:
            _, row = self.row_of.popitem(last=False)
        else:
            return None
        self._pending[digest] = row
        return row

    def commit(self, digest: bytes) -> None:
        """The forward has written the row reserved for ``digest``: make it findable."""
        self.row_of[digest] = self._pending.pop(digest)

    def drop(self, digest: bytes) -> None:
        """Forget the snapshot named ``digest`` (if any); its row becomes free."""
        row = self.row_of.pop(digest, None)
        if row is not None:
            self._free.append(row)


class KVCacheManager:
    """Block bookkeeping per sequence: prefix matching, growing block tables, freeing, caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, state_slots: int = 0,
                 state_snapshots: int = 0, host_blocks: int = 0):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
        self.counters = CacheCounters()
        # the host tier (host_blocks > 0): evicted cached blocks are copied to host memory, and prefix
        # hits there are copied back; the copies are handed to each step by ``take_swaps``
        self.host = None
        self._swap_out: list[tuple[int, int]] = []  # (device block, host block), this step
        self._swap_in: list[tuple[int, int]] = []  # (host block, device block) of admitted sequences, this step
        self._swap_in_of: dict["Sequence", list[tuple[int, int]]] = {}  # matched, not yet admitted
        if host_blocks:
            if not enable_prefix_caching:
                raise ValueError("the host cache tier keeps prefix-cache blocks; it needs prefix caching on")
            if state_slots:
                raise ValueError("the host cache tier does not support models with KDA layers (their prefix hits "
                                 "also need recurrent-state snapshots, which stay on the device)")
            from .host_cache import HostBlockIndex

            self.host = HostBlockIndex(host_blocks)
            self.allocator.on_evict = self._evict_to_host
        # the disk tier (disk_cache.DiskBlockStore, set by the engine): named blocks are queued for writing
        # (``take_disk_writes``), prefix hits on disk are read while matching and loaded by the step
        self.disk = None
        self._disk_in: list[tuple[list, int]] = []  # (block content read from disk, device block), this step
        self._disk_in_of: dict["Sequence", list[tuple[list, int]]] = {}  # matched, not yet admitted
        self._disk_writes: list[tuple[int, bytes]] = []  # (device block, hash) named since the last take
        # recurrent-state slots (models with KDA layers): a sequence holds one from its first
        # allocation until its blocks are freed
        self.state_slots = state_slots
        self._free_slots = list(range(state_slots - 1, -1, -1))
        # snapshots of that state at block boundaries: what lets a hybrid model skip a cached prefix
        self.snapshots: StateSnapshots | None = None
        if state_slots and state_snapshots and enable_prefix_caching:
            self.snapshots = StateSnapshots(state_snapshots)
            self.allocator.on_uncache = self.snapshots.drop
        # branch points (see match_prefix): False keeps only the prompt-end and generation snapshots
        self.branch_snapshots = True
        self._branch_at: dict["Sequence", int] = {}  # planned: snapshot once the sequence's state reaches here
        self._branch_pending: dict["Sequence", bytes] = {}  # written by this step, named after it

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some sequence."""
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, seq: "Sequence", num_full_blocks: int) -> list[bytes]:
        """Hashes of the sequence's first ``num_full_blocks`` full blocks (memoized on the sequence)."""
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        images = getattr(seq, "images", None)
        # a LoRA adapter's requests compute other latents for the same tokens: its digest goes into every
        # block's hash, so blocks are shared only under the same adapter (or none)
        lora = getattr(seq, "lora_key", None)
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            extra = images.block_key(i * bs, (i + 1) * bs) if images is not None else None
            if lora is not None:
                extra = b"lora:" + lora + (b"" if extra is None else b"|" + extra)
            hashes.append(block_hash(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs], extra))
        return hashes[:num_full_blocks]

    def match_prefix(self, seq: "Sequence", token_budget: int | None = None) -> int:
        """Attach the cached blocks matching the start of a sequence that holds no blocks yet.

        At least one token is always left to compute (its logits are needed). With KDA layers
        (``state_slots``) the hit must also end where a state snapshot exists: the longest matched
        chain of blocks that does, its snapshot noted in ``seq.snapshot_restore`` for ``state_init``
        (no snapshot pool: no hit). Returns the number of tokens found cached and sets
        ``seq.num_computed_tokens`` to it. The caller counts the lookup in ``counters`` once the
        sequence is actually admitted (``record_lookup``).

        Branch points (KDA layers): when the matched chain goes on past the hit, some earlier
        sequence shares this prompt up to the chain's end and differs after it (or has not computed
        further yet). That end is where the two branch, so later requests (the same system prompt and
        tools with another task) will likely branch there too: ``plan_snapshot`` snapshots this
        sequence's state there while it recomputes the chain, and the next such request hits.
        
        Host tier (``host``): see ``_match_with_host``; ``token_budget`` (the step's tokens left) bounds
        its swap-ins so that the sequence's first chunk still finds free blocks.
        """
        assert not seq.block_table, "match_prefix on a sequence that already holds blocks"
        seq.snapshot_restore = None
        self._branch_at.pop(seq, None)
        if not self.allocator.enable_prefix_caching:
            seq.num_computed_tokens = 0
            return 0
        matchable = (len(seq.token_ids) - 1) // self.block_size
        hashes = self._hashes(seq, matchable)
        if self.host is not None or self.disk is not None:
            return self._match_with_host(seq, hashes, token_budget)
        blocks: list[int] = []
        for digest in hashes:
            block = self.allocator.lookup(digest)
            if block is None:
                break
            blocks.append(block)
        if self.state_slots:  # resume only where the recurrent state is known
            n = len(blocks)
            while n and (self.snapshots is None or hashes[n - 1] not in self.snapshots.row_of):
                n -= 1
            if self.snapshots is not None and self.branch_snapshots and len(blocks) > n:
                self._branch_at[seq] = len(blocks) * self.block_size
            blocks = blocks[:n]
            if n:
                seq.snapshot_restore = self.snapshots.get(hashes[n - 1])
        for block in blocks:
            self.allocator.acquire_cached(block)
            seq.block_table.append(block)
        hit = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = hit
        seq.num_registered_blocks = len(seq.block_table)
        return hit

    def _match_with_host(self, seq: "Sequence", hashes: list[bytes], token_budget: int | None) -> int:
        """``match_prefix`` with the host tier: the chain of hashes continues through blocks held on
        the device (shared, as without the tier) and blocks held only on the host. Each of the latter
        gets a fresh device block, named by its hash at once (a sequence matched later in this step
        shares it: the swap-in runs before the forward), and a swap-in (host block, device block)
        that the step runs when the sequence is admitted (``admit``; ``free`` calls it off). A host
        hit is taken only while enough free blocks stay for the sequence's first chunk (the rest of
        the prompt, or ``token_budget`` tokens of it): swapping in blocks that would only be given
        back when admission fails is wasted copying.

        Disk tier (``disk``): a hash held by neither continues the chain when its file is on disk: the file
        is read and checked here, synchronously (a bad or vanished file ends the chain: those tokens are
        computed), into a fresh device block named at once, as a host hit is; the step copies the content
        in after the host swap-ins (``take_disk_loads``)."""
        bs, alloc = self.block_size, self.allocator
        swaps: list[tuple[int, int]] = []
        loads: list[tuple[list, int]] = []
        for digest in hashes:
            block = alloc.lookup(digest)
            if block is not None:
                alloc.acquire_cached(block)  # now, so that a swap-in's allocation cannot evict it
            else:
                src = self.host.get(digest) if self.host is not None else None
                if src is None and (self.disk is None or digest not in self.disk):
                    break
                held = len(seq.block_table) + 1  # blocks held after this hit
                rest = seq.num_tokens - held * bs
                chunk = rest if token_budget is None else min(rest, token_budget)
                if alloc.num_free < 1 + self.blocks_needed(held * bs + chunk) - held:
                    break
                if src is not None:
                    self.host.pin(src)  # before allocating: an eviction to the host must not reuse src
                else:
                    content = self.disk.read(digest)
                    if content is None:  # gone or failed its checks: compute from here on
                        break
                block = alloc.allocate()
                alloc.register(block, digest)
                if src is not None:
                    swaps.append((src, block))
                else:
                    loads.append((content, block))
            seq.block_table.append(block)
        if swaps:
            self._swap_in_of[seq] = swaps
        if loads:
            self._disk_in_of[seq] = loads
        hit = len(seq.block_table) * bs
        seq.num_computed_tokens = hit
        seq.num_registered_blocks = len(seq.block_table)
        return hit

    def _evict_to_host(self, block: int, digest: bytes) -> None:
        """The allocator is about to reuse cached ``block``: keep its content in the host tier (a
        swap-out this step runs before anything writes the block), unless the tier has it already."""
        if digest in self.host:
            self.host.get(digest)  # the same content (same hash): only mark it recently used
            return
        dst = self.host.store(digest)
        if dst is not None:  # None: every host block is read by this step; the content is dropped
            self._swap_out.append((block, dst))
            self.counters.host_blocks_swapped_out += 1

    def admit(self, seq: "Sequence") -> None:
        """The scheduler admitted ``seq`` into this step: its host-tier swap-ins become part of the step."""
        swaps = self._swap_in_of.pop(seq, None)
        if swaps:
            self._swap_in.extend(swaps)
            self.counters.host_blocks_swapped_in += len(swaps)
            self.counters.host_cache_hits += len(swaps) * self.block_size
        loads = self._disk_in_of.pop(seq, None)
        if loads:
            self._disk_in.extend(loads)
            self.counters.disk_blocks_loaded += len(loads)
            self.counters.disk_cache_hits += len(loads) * self.block_size

    def take_swaps(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's copies, (swap_out, swap_in), for the ``ScheduledBatch``; the runner runs them
        before the forward, swap-outs first. Releases the step's pins on host blocks: nothing else is
        decided in this step."""
        assert not self._swap_in_of and not self._disk_in_of, \
            "take_swaps while a matched sequence is neither admitted nor freed"
        out, into = self._swap_out, self._swap_in
        self._swap_out, self._swap_in = [], []
        if self.host is not None:
            self.host.unpin_all()
        return out, into

    def take_disk_loads(self) -> list[tuple[list, int]]:
        """This step's blocks read from the disk tier, (content, device block), for the ``ScheduledBatch``;
        the runner copies them in after the host-tier copies, before the forward."""
        loads, self._disk_in = self._disk_in, []
        return loads

    def take_disk_writes(self) -> list[tuple[int, bytes]]:
        """The blocks named since the last call that the disk tier lacks, (device block, hash): their
        content is final (named after the step that computed it) and still in place until the next step."""
        writes, self._disk_writes = self._disk_writes, []
        return writes

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        self.counters.prefix_cache_queries += num_tokens
        self.counters.prefix_cache_hits += num_hit

    def can_allocate(self, seq: "Sequence", num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.allocator.num_free

    def allocate(self, seq: "Sequence", num_new_tokens: int) -> bool:
        """Grow the block table to hold ``num_new_tokens`` more tokens. False (nothing taken) if the
        pool has too few free blocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.allocator.num_free:
            return False
        if self.state_slots and seq.state_slot is None:
            if not self._free_slots:
                return False
            seq.state_slot = self._free_slots.pop()
        for _ in range(need):
            seq.block_table.append(self.allocator.allocate())
        return True

    def free(self, seq: "Sequence") -> None:
        """Release all of a sequence's blocks. Its last blocks are freed first, so under LRU the
        prefix blocks (the most shareable) are evicted last. Swap-ins planned for it and not yet
        admitted are called off: their blocks are unnamed (the content never arrives) and go back
        as plain free blocks, their host blocks unpinned."""
        for src, block in self._swap_in_of.pop(seq, ()):
            self.host.unpin(src)
            self.allocator.forget(block)
        for _, block in self._disk_in_of.pop(seq, ()):
            self.allocator.forget(block)
        for block in reversed(seq.block_table):
            self.allocator.release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
        seq.snapshot_restore = None
        self._branch_at.pop(seq, None)
        self._branch_pending.pop(seq, None)  # none at a free between steps: named by cache_full_blocks
        if getattr(seq, "state_slot", None) is not None:
            self._free_slots.append(seq.state_slot)
            seq.state_slot = None

    def cache_full_blocks(self, seq: "Sequence") -> None:
        """Register the sequence's blocks that became full and written (after a step), and name the
        state snapshot the step wrote for it, if any."""
        if not self.allocator.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full > seq.num_registered_blocks:
            hashes = self._hashes(seq, full)
            for i in range(seq.num_registered_blocks, full):
                self.allocator.register(seq.block_table[i], hashes[i])
                if self.disk is not None and self.allocator.hash_of[seq.block_table[i]] == hashes[i] \
                        and self.disk.wants(hashes[i]):
                    self._disk_writes.append((seq.block_table[i], hashes[i]))
            seq.num_registered_blocks = full
        if seq.snapshot_pending is not None:
            self.snapshots.commit(seq.snapshot_pending)
            self.snapshots.num_saved += 1
            seq.snapshot_pending = None
        branch = self._branch_pending.pop(seq, None)
        if branch is not None:
            self.snapshots.commit(branch)
            self.snapshots.num_saved += 1
            self.snapshots.num_branch_saved += 1

    # ---- recurrent state (models with KDA layers) -------------------------------------------------
    def state_init(self, seq: "Sequence") -> tuple[int, int | None] | None:
        """What a scheduled sequence's state slot must hold before the step: ``(slot, None)`` zeros
        when it starts at token 0 (its slot may hold a previous sequence's state), ``(slot, row)``
        snapshot ``row`` when it resumes from a prefix hit, None when the slot already holds its state."""
        if seq.state_slot is None:
            return None
        if seq.snapshot_restore is not None:
            row, seq.snapshot_restore = seq.snapshot_restore, None
            self.snapshots.num_restored += 1
            return seq.state_slot, row
        if seq.num_computed_tokens == 0:
            return seq.state_slot, None
        return None

    def plan_snapshot(self, seq: "Sequence", num_new_tokens: int) -> list[tuple[int, int]]:
        """Which snapshots this step should take of the sequence's state: ``(offset, row)`` pairs in
        increasing offset — after the first ``offset`` of its ``num_new_tokens`` tokens, into snapshot
        row ``row`` — none, one or two.

        Policy (at most two copies per sequence per step, so bounded by the batch):

        - a chunk that finishes the sequence's known tokens (the last prompt chunk, a decode)
          snapshots at the last block boundary it reaches; for a multi-token chunk, at most at the
          last token minus one, so a later request with exactly these tokens (which must compute its
          last token) can hit too. Earlier prompt chunks take none: a long prompt does not flood
          the pool.
        - the chunk that reaches the sequence's branch point (``match_prefix``: the end of the cached
          chain it matched beyond its hit) snapshots there as well: one extra copy per admission.
          When both points fall in one chunk, the KDA layers split it at both.
        - a snapshot after generated tokens (past the prompt) replaces the sequence's previous one
          in its row: only the latest is worth keeping (a conversation's next turn resumes there),
          so a long generation holds one row, not one per block.
        - no snapshot where one with the same name exists or is being written (it holds the same
          state); none when every row is already being written this step.
        """
        if self.snapshots is None or seq.state_slot is None:
            return []
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        saves: list[tuple[int, int]] = []
        branch = self._branch_at.get(seq)
        if branch is not None and branch <= end:
            del self._branch_at[seq]
            if branch > start:
                reserved = self._reserve(seq, branch, output=False)
                if reserved is not None:
                    self._branch_pending[seq] = reserved[0]
                    saves.append((branch - start, reserved[1]))
        if end != seq.num_tokens:
            return saves
        bs = self.block_size
        point = (end if num_new_tokens == 1 else end - 1) // bs * bs
        if point <= start or point == 0:
            return saves
        output = point > seq.num_prompt_tokens
        reserved = self._reserve(seq, point, output)
        if reserved is not None:
            seq.snapshot_pending = reserved[0]
            if output:
                seq.output_snapshot = reserved[0]
            saves.append((point - start, reserved[1]))
        return saves

    def _reserve(self, seq: "Sequence", point: int, output: bool) -> tuple[bytes, int] | None:
        """Reserve a row for the snapshot of ``seq`` after its first ``point`` tokens (a block
        boundary); returns (its name, the row), or None when it exists already or no row is left
        this step."""
        digest = self._hashes(seq, point // self.block_size)[-1]
        if self.snapshots.has(digest):
            self.snapshots.get(digest)  # mark recently used
            return None
        row = self.snapshots.reserve(digest, replace=seq.output_snapshot if output else None)
        return None if row is None else (digest, row)
