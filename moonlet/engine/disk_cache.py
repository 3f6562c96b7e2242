"""The disk tier of the prefix cache: cached blocks that survive a restart and outgrow host memory.

With ``EngineConfig.disk_cache_dir`` set, every block the engine names by its content hash (a full,
computed prompt or output block, ``cache.block_hash``) is also written to a file there, in the
background (write-through). A later prompt whose prefix chain continues into hashes that neither the
device pool nor the host tier holds reads those files back into fresh device blocks before its step's
forward: a prefix-cache hit, as a host-tier swap-in is. The block hash is blake2b over the parent's
hash and the token ids, the same in every process, so a restarted engine finds the blocks an earlier
one wrote.

Layout on disk::

    disk_cache_dir/
      <fingerprint[:16]>/           one directory per model and cache layout (``cache_fingerprint``)
        manifest.json               what the fingerprint was computed from (readable), written once
        lock                        flock'ed while an engine uses the directory
        blocks/<ab>/<hash hex>.kv   one file per block (<ab>: the hash's first byte, 256 subdirectories)

A block file is a 48-byte header (magic, block hash, the layout's 16-byte fingerprint, payload length,
CRC-32 of the payload) and the payload: the block's latent rows for every latent layer in the pool's
dtype (bytes as stored, FP8 included), then for an FP8 pool its per-entry scales (float32), then for
MoBA models its per-page sums (float32) — what the host tier keeps, in the same order.

Why one file per block: eviction is an ``unlink`` (no segment compaction, no index file to keep
consistent with the data), a crash can at worst leave a temporary file (deleted when the directory is
opened next), and the filesystem is the index (a start-up scan rebuilds the LRU from the files' sizes and
modification times). Blocks are large enough for this to be cheap: K2 at 64 tokens per block is
4.5 MB per block in bf16, 2.3 MB in FP8; the per-file overhead (one inode, one open per read) is small
beside that. Writes go to a temporary name in the same directory and are renamed into place
(``os.replace``, atomic on POSIX), so a reader sees either no file or a whole one; there is no fsync:
after a power loss a renamed file may hold zeros or garbage, which the CRC rejects (a corrupt,
truncated, mislabelled or foreign file is a miss, deleted, counted in ``corrupt``, never loaded).

LRU by use: a hit sets the file's modification time (``os.utime``), a write creates it, and the start-up
scan orders the files by it, so the recency order survives restarts. When a write would take the
tier over ``capacity`` bytes, the least recently used files are deleted first.

Threads: writes run on one background thread fed by a bounded queue (``put`` drops the block and counts
it when the queue is full: the engine loop never waits for the disk to write). Reads run on the engine
thread, synchronously, while a step is scheduled (``read``): the file is checked before the hit is
taken, so a bad file costs a recomputation, never a wrong latent. A step whose prompt hits N blocks on
disk therefore waits for N file reads (a few ms per block for K2-sized blocks on an NVMe drive).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import shutil
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .kv_quant import NUM_SCALES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"MNLTKV01"
# magic, block hash, layout fingerprint (first 16 bytes), payload length, CRC-32 of the payload
HEADER = struct.Struct("<8s16s16sII")
DEFAULT_DISK_CACHE_BYTES = 10 * 2**30  # disk_cache_size when only disk_cache_dir is given
WRITE_QUEUE_BYTES = 256 * 2**20  # blocks waiting to be written, in payload bytes (at least 4 blocks)
SAMPLES_PER_TENSOR = 64  # values of each weight tensor hashed into the weights digest


@dataclass(frozen=True)
class BlockLayout:
    """What one block's payload holds: ``data`` [layers, block_size, latent_dim] of the pool's dtype
    (as bytes), ``scales`` [layers, block_size, 2] float32 (FP8 pools), ``sums`` [sum_layers, latent_dim]
    float32 (MoBA models)."""

    num_layers: int
    block_size: int
    latent_dim: int
    dtype: torch.dtype
    fp8_scales: bool
    num_sum_layers: int

    @property
    def shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each part, in file order; the data part as uint8 bytes."""
        elt = torch.empty(0, dtype=self.dtype).element_size()
        parts = [((self.num_layers, self.block_size, self.latent_dim * elt), torch.uint8)]
        if self.fp8_scales:
            parts.append(((self.num_layers, self.block_size, NUM_SCALES), torch.float32))
        if self.num_sum_layers:
            parts.append(((self.num_sum_layers, self.latent_dim), torch.float32))
        return parts

    @property
    def payload_bytes(self) -> int:
        total = 0
        for shape, dtype in self.shapes:
            n = torch.empty(0, dtype=dtype).element_size()
            for s in shape:
                n *= s
            total += n
        return total

    @property
    def file_bytes(self) -> int:
        return HEADER.size + self.payload_bytes


def weights_digest(modules) -> str:
    """A cheap identity of the weights: per tensor of each module's state dict its name, shape, dtype and
    ``SAMPLES_PER_TENSOR`` evenly spaced values (bytes), hashed. Reads a few bytes per tensor, not the
    weights, so it is fast for any size; two checkpoints that differ only between the sampled positions
    of every tensor would share it (fine-tuning, merging an adapter or another seed change them all)."""
    h = hashlib.blake2b(digest_size=16)
    for m, module in enumerate(modules):
        for name, t in module.state_dict().items():
            if not isinstance(t, torch.Tensor):
                continue
            h.update(f"{m}:{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            if flat.element_size() == 1:
                flat = flat.view(torch.uint8)  # FP8 / INT4-packed bytes: no indexing kernels for float8 on the CPU
            index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), SAMPLES_PER_TENSOR)).round().long()
            sample = flat[index.to(flat.device)].cpu().contiguous()
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_fingerprint(model, pool, num_sum_layers: int, extra_modules=(), extra: dict | None = None) -> dict:
    """What decides whether a cached block's bytes are right for this engine: the model config, the
    weights (``weights_digest``), the model's dtype, and the cache layout (block size, latent layers,
    latent width, storage dtype with FP8 scales, MoBA page sums, byte order). Returns the manifest: these
    fields plus ``fingerprint``, their hash (hex); blocks are only ever loaded under the same one."""
    info = {
        "format": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "model_dtype": str(model.dtype),
        "weights": weights_digest([model, *extra_modules]),
        "block_size": pool.block_size,
        "latent_layers": list(pool.layer_ids),
        "latent_dim": pool.latent_dim,
        "kv_lora_rank": pool.kv_lora,
        "cache_dtype": str(pool.dtype),
        "page_sum_layers": num_sum_layers,
        "byteorder": sys.byteorder,
        "tensor_parallel_size": 1,
        **(extra or {}),
    }
    text = json.dumps(info, sort_keys=True, default=str)
    info["fingerprint"] = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return info


@dataclass
class DiskCounters:
    blocks_read: int = 0  # blocks read back (hits; engine thread)
    bytes_read: int = 0
    corrupt: int = 0  # files rejected by the checks (and deleted)
    blocks_written: int = 0  # blocks written (writer thread)
    bytes_written: int = 0
    writes_dropped: int = 0  # blocks not written because the queue was full (engine thread)
    write_errors: int = 0  # writes that failed (disk full, permissions; writer thread)
    blocks_evicted: int = 0  # files deleted to stay under the size cap


class DiskBlockStore:
    """The disk tier's files: an LRU index (hash -> file bytes), the background writer, ``read`` with
    its checks. ``directory``: the layout's own directory (``open_disk_cache`` picks it);
    ``manifest``: ``cache_fingerprint``'s dict. One engine per directory at a time (an exclusive
    ``flock``); ``close`` drains the queue and releases it."""

    def __init__(self, directory: str | os.PathLike, capacity: int, layout: BlockLayout, manifest: dict,
                 queue_blocks: int | None = None):
        self.directory = Path(directory)
        self.layout = layout
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        self._layout_id = bytes.fromhex(self.fingerprint)[:16]
        self.capacity = capacity
        if capacity < layout.file_bytes:
            raise ValueError(f"disk cache size {capacity} bytes is smaller than one block file "
                             f"({layout.file_bytes} bytes); raise disk_cache_size")
        self.counters = DiskCounters()
        self.blocks_dir = self.directory / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_lock()
        try:
            self._check_manifest()
            self._lock = threading.Lock()  # guards _files, bytes_used, _pending
            self._files: OrderedDict[bytes, int] = OrderedDict()  # hash -> file bytes; first = evicted first
            self.bytes_used = 0
            self._scan()
        except BaseException:
            self._lock_file.close()
            raise
        self._pending: set[bytes] = set()  # queued or being written
        if queue_blocks is None:
            queue_blocks = max(4, WRITE_QUEUE_BYTES // layout.payload_bytes)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_blocks)
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="moonlet-disk-cache", daemon=True)
        self._thread.start()

    # ---- opening ----------------------------------------------------------------------------------
    def _take_lock(self):
        f = open(self.directory / "lock", "a+")
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: no protection against a second engine
            pass
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ValueError(f"the disk cache directory {str(self.directory)!r} is in use by another engine "
                                 f"(of this process or another); give each engine its own disk_cache_dir, or "
                                 f"close the other one first") from None
            raise
        return f

    def _check_manifest(self) -> None:
        path = self.directory / "manifest.json"
        if path.is_file():
            try:
                found = json.loads(path.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                found = None
            if found != self.fingerprint:
                raise ValueError(f"the disk cache directory {str(self.directory)!r} holds blocks of another model "
                                 f"or cache layout (its manifest.json says fingerprint {found!r}, this engine's is "
                                 f"{self.fingerprint!r}); delete that directory or point disk_cache_dir elsewhere")
            return
        tmp = path.with_name(f"manifest.json.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)

    def _scan(self) -> None:
        """Index the block files: leftover temporary files (a crash mid-write) are deleted, files of the
        wrong size are deleted as corrupt, the rest ordered by modification time (last use). If they take
        more than ``capacity`` (a smaller cap than last time), the oldest go."""
        expected = self.layout.file_bytes
        found: list[tuple[int, bytes, int]] = []
        for sub in os.scandir(self.blocks_dir):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                if ".tmp" in name:
                    _unlink(entry.path)
                    continue
                if not name.endswith(".kv"):
                    continue
                try:
                    digest = bytes.fromhex(name[:-3])
                    st = entry.stat()
                except (ValueError, OSError):
                    continue
                if st.st_size != expected or len(digest) != 16:
                    _unlink(entry.path)
                    self.counters.corrupt += 1
                    continue
                found.append((st.st_mtime_ns, digest, st.st_size))
        for _, digest, size in sorted(found):
            self._files[digest] = size
            self.bytes_used += size
        while self.bytes_used > self.capacity:
            self._evict_one()

    # ---- bookkeeping --------------------------------------------------------------------------------
    def path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.blocks_dir / h[:2] / f"{h}.kv"

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, digest: bytes) -> bool:
        """Whether a finished file for ``digest`` is indexed (it may still fail its checks on read)."""
        return digest in self._files

    def wants(self, digest: bytes) -> bool:
        """Whether a block named ``digest`` should be written: no file for it and none queued."""
        with self._lock:
            return digest not in self._files and digest not in self._pending

    def _evict_one(self) -> None:
        """Delete the least recently used file (caller holds the lock, or is the constructor)."""
        digest, size = self._files.popitem(last=False)
        self.bytes_used -= size
        self.counters.blocks_evicted += 1
        _unlink(self.path(digest))

    def _drop(self, digest: bytes) -> None:
        with self._lock:
            size = self._files.pop(digest, None)
            if size is not None:
                self.bytes_used -= size

    # ---- reading (engine thread) --------------------------------------------------------------------
    def read(self, digest: bytes) -> list[torch.Tensor] | None:
        """The block named ``digest`` as CPU tensors in ``BlockLayout.shapes`` order, checked (magic,
        hash, layout fingerprint, length, CRC-32) and marked recently used; None when it is not here, is
        gone, or fails a check (then the file is deleted and counted in ``corrupt``)."""
        with self._lock:
            if digest not in self._files:
                return None
            self._files.move_to_end(digest)
        path = self.path(digest)
        expected = self.layout.file_bytes
        buf = bytearray(expected)
        try:
            with open(path, "rb") as f:
                n = f.readinto(buf)
                extra = f.read(1)
        except FileNotFoundError:  # evicted meanwhile (or deleted by hand)
            self._drop(digest)
            return None
        except OSError as e:
            logger.warning("disk cache: cannot read %s (%s); treating it as a miss", path, e)
            self._drop(digest)
            return None
        ok = n == expected and not extra
        if ok:
            magic, name, layout_id, length, crc = HEADER.unpack_from(buf)
            payload = memoryview(buf)[HEADER.size:]
            ok = (magic == MAGIC and name == digest and layout_id == self._layout_id
                  and length == len(payload) and zlib.crc32(payload) == crc)
        if not ok:
            logger.warning("disk cache: %s is truncated, corrupt or not this model's block; deleted, recomputing it",
                           path)
            self.counters.corrupt += 1
            self._drop(digest)
            _unlink(path)
            return None
        try:
            os.utime(path)  # last use, for the LRU order after a restart
        except OSError:
            pass
        self.counters.blocks_read += 1
        self.counters.bytes_read += expected
        flat = torch.frombuffer(buf, dtype=torch.uint8, offset=HEADER.size)
        parts, at = [], 0
        for shape, dtype in self.layout.shapes:
            size = torch.empty(0, dtype=dtype).element_size()
            for s in shape:
                size *= s
            parts.append(flat[at:at + size].view(dtype).view(shape))
            at += size
        return parts

    # ---- writing (engine thread queues, writer thread writes) ----------------------------------------
    def put(self, digest: bytes, parts: list[torch.Tensor], event=None) -> bool:
        """Queue the block named ``digest`` for writing: ``parts`` CPU tensors in ``BlockLayout.shapes``
        order (contiguous; not changed afterwards), ``event`` a CUDA event to wait for before reading them
        (their copy from the device may still be in flight). False (counted) when the queue is full."""
        if self._closed:
            return False
        with self._lock:
            if digest in self._files or digest in self._pending:
                return True
            self._pending.add(digest)
        try:
            self._queue.put_nowait((digest, parts, event))
        except queue.Full:
            with self._lock:
                self._pending.discard(digest)
            self.counters.writes_dropped += 1
            return False
        return True

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                digest, parts, event = item
                if event is not None:
                    event.synchronize()
                self._write(digest, parts)
            except Exception:  # noqa: BLE001 - the engine goes on; this block is just not on disk
                logger.exception("disk cache: writing a block failed")
                self.counters.write_errors += 1
                with self._lock:
                    self._pending.discard(digest)
            finally:
                self._queue.task_done()

    def _write(self, digest: bytes, parts: list[torch.Tensor]) -> None:
        path = self.path(digest)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        views = [memoryview(p.contiguous().view(torch.uint8).numpy()).cast("B") for p in parts]
        crc = 0
        for v in views:
            crc = zlib.crc32(v, crc)
        length = sum(len(v) for v in views)
        size = HEADER.size + length
        with self._lock:  # room first, so the tier never holds more than capacity
            while self._files and self.bytes_used + size > self.capacity:
                self._evict_one()
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, digest, self._layout_id, length, crc))
                for v in views:
                    f.write(v)
            os.replace(tmp, path)
        except OSError as e:
            _unlink(tmp)
            self.counters.write_errors += 1
            if self.counters.write_errors == 1 or e.errno == errno.ENOSPC:
                logger.warning("disk cache: writing %s failed (%s); the block stays uncached on disk", path, e)
            with self._lock:
                self._pending.discard(digest)
            return
        with self._lock:
            self._pending.discard(digest)
            self._files[digest] = size
            self.bytes_used += size
        self.counters.blocks_written += 1
        self.counters.bytes_written += size

    def flush(self) -> None:
        """Wait until every queued block is written (or failed)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, stop the writer, release the directory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._lock_file.close()


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def open_disk_cache(directory: str | os.PathLike, capacity: int | None, model, pool, num_sum_layers: int,
                    extra_modules=(), extra: dict | None = None) -> DiskBlockStore:
    """The disk tier for this model and pool under ``directory``: its layout's own subdirectory
    (``<fingerprint[:16]>``), made if new (a fresh start, logged, naming the other layouts' directories
    found beside it with their sizes, which this engine neither reads nor deletes). ``capacity``: bytes
    (None: ``DEFAULT_DISK_CACHE_BYTES``, or half of what the filesystem has free when that is less).
    ValueError for a capacity beyond the free space plus what the tier already holds."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"engine argument disk_cache_dir={str(directory)!r} is not a directory")
    manifest = cache_fingerprint(model, pool, num_sum_layers, extra_modules, extra)
    layout = BlockLayout(pool.num_layers, pool.block_size, pool.latent_dim, pool.dtype, pool.scales is not None,
                         num_sum_layers)
    sub = root / manifest["fingerprint"][:16]
    fresh = not (sub / "manifest.json").is_file()
    sub.mkdir(parents=True, exist_ok=True)
    held = _tree_bytes(sub / "blocks")
    room = shutil.disk_usage(sub).free + held
    if capacity is None:
        capacity = min(DEFAULT_DISK_CACHE_BYTES, room // 2)
    elif capacity > room:
        raise ValueError(f"engine argument disk_cache_size ({capacity} bytes) is more than the filesystem of "
                         f"{str(root)!r} has room for ({room} bytes free, this cache's blocks included); lower it")
    store = DiskBlockStore(sub, capacity, layout, manifest)
    if fresh:
        others = [(p.name, _tree_bytes(p / "blocks")) for p in sorted(root.iterdir())
                  if p != sub and (p / "manifest.json").is_file()]
        note = ""
        if others:
            note = "; other models' or layouts' caches beside it (not used, not deleted): " + ", ".join(
                f"{name} ({size / 2**20:.1f} MiB)" for name, size in others)
        logger.warning("disk cache: new directory %s for this model and cache layout%s", sub, note)
    else:
        logger.info("disk cache: %d blocks (%.1f MiB) in %s", len(store), store.bytes_used / 2**20, sub)
    return store


def _tree_bytes(path: Path) -> int:
    total = 0
    if path.is_dir():
        for dirpath, _, names in os.walk(path):
            for name in names:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
    return total


# ---- moving blocks between the pool and the tier (the runner's side) ----------------------------------

def gather_blocks(pool, sums: torch.Tensor | None, blocks: list[int]) -> tuple[list[list[torch.Tensor]], object]:
    """The content of device ``blocks`` as CPU tensors, per block in ``BlockLayout.shapes`` order; and a
    CUDA event to wait for before reading them (None on the CPU). On CUDA the copies are asynchronous
    into pinned memory, on the current stream: issued right after the step that computed the blocks, they
    read them before any later step can overwrite them."""
    device = pool.data.device
    index = torch.tensor(blocks, dtype=torch.long, device=device)
    sources = [pool.data.view(torch.uint8)]
    if pool.scales is not None:
        sources.append(pool.scales)
    if sums is not None:
        sources.append(sums)
    moved = []
    for src in sources:
        rows = src.index_select(1, index).transpose(0, 1).contiguous()  # [n, layers, ...]
        if device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            rows = host
        moved.append(rows)
    event = None
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return [[part[i] for part in moved] for i in range(len(blocks))], event


def load_blocks(pool, sums: torch.Tensor | None, items: list[tuple[list[torch.Tensor], int]]) -> None:
    """Copy blocks read from disk into their device blocks: ``items`` of (parts, device block)."""
    if not items:
        return
    device = pool.data.device
    dev = torch.tensor([b for _, b in items], dtype=torch.long, device=device)
    targets = [pool.data.view(torch.uint8)]
    if pool.scales is not None:
        targets.append(pool.scales)
    if sums is not None:
        targets.append(sums)
    for k, dst in enumerate(targets):
        rows = torch.stack([parts[k] for parts, _ in items]).to(device)  # [n, layers, ...]
        dst.index_copy_(1, dev, rows.transpose(0, 1))

