"""Tensor-parallel serving: one engine, its model split over ``tensor_parallel_size`` processes.

Rank 0 is the engine process: scheduler, cache manager, sampler, the APIs, and one share of the
model (``moonlet.parallel``). Ranks 1..W-1 are worker processes started here, each holding its own
share and its own copy of the latent KV pool (MLA's latent has no head dimension, so every rank
writes the same latents into the same block ids). Each step, rank 0 sends the step's
``StepInput`` to every worker over a pipe and runs its own share; the collectives inside the model
keep the ranks in lockstep, and every rank ends with the full logits, which only rank 0 samples.

So the scheduler, prefix cache, speculative decoding, structured outputs and image encoding live on
rank 0 alone; the workers only run forwards (and their CUDA graphs, captured at start-up in the same
order as rank 0's). A worker that dies takes the engine down with a clear error (collectives would
otherwise wait for it); the engine is then shut down, not repaired.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
import weakref

import torch

from ..parallel import TensorParallel

HOST = "127.0.0.1"
# How long start-up (spawn, import, load a share) may take before rank 0 gives up on a worker.
STARTUP_TIMEOUT_S = 3600


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed or exited."""


def rank_device(device: torch.device | str, rank: int) -> torch.device:
    """Rank r's device: ``cuda:(i + r)`` for rank 0 on ``cuda:i``; the CPU for every rank on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    index = (device.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size needs GPU {index} for rank {rank}, but this machine has "
                         f"{torch.cuda.device_count()} GPU(s) visible; lower tensor_parallel_size or make more GPUs "
                         f"visible (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", index)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def build_runner(model, rc, workers=None, lora=None):
    """The latent pool, recurrent states (models with KDA layers) and ModelRunner for a loaded model
    and a ``ResolvedConfig``, decode graphs captured when the config asks for them: the same on every
    rank, so the ranks' pools have the same block ids and their graphs capture the same collectives.
    ``lora``: the engine's ``MultiLora`` (multi-LoRA serving), wired in before any graph is captured."""
    from .cache import LatentCachePool, latent_layer_ids
    from .recurrent import RecurrentStates
    from .runner import ModelRunner

    config = model.config
    # with decode graphs, one block more than the cache manager hands out: the padding rows' scratch
    scratch = 1 if rc.decode_graphs != "off" else 0
    pool = LatentCachePool(config.num_hidden_layers, rc.num_blocks + scratch, rc.block_size, config.latent_dim,
                           dtype=rc.kv_cache_dtype or model.dtype, device=model.device,
                           layer_ids=latent_layer_ids(config), kv_lora=config.kv_lora_rank)
    states = None
    if config.kda_layer_ids:
        heads = model.model.layers[config.kda_layer_ids[0]].self_attn.num_heads  # this rank's share
        # snapshot rows, then (speculative decoding) the rows of the states after each draft
        states = RecurrentStates(config, rc.max_num_seqs, model.dtype, model.device,
                                 num_snapshots=rc.state_snapshots + rc.spec_state_rows, scratch_row=bool(scratch),
                                 num_heads=heads)
    runner = ModelRunner(model, pool, expanded_prefill=rc.expanded_prefill, triton_decode=rc.triton_decode,
                         states=states)
    runner.workers = workers
    runner.lora = runner.kv.lora = lora
    if rc.host_blocks:  # the host tier of the prefix cache, shaped after the pool (and MoBA page sums)
        from .host_cache import HostCachePool

        sums = runner.kv.page_sums
        runner.host = HostCachePool(pool, rc.host_blocks, num_sum_layers=sums.data.shape[0] if sums is not None else 0,
                                    pin_memory=pool.data.device.type == "cuda")
    if workers is not None:  # the workers build theirs at the same time (graph capture runs collectives)
        workers.init_runners(rc)
    if rc.decode_graphs != "off":
        runner.enable_decode_graphs(scratch_block=rc.num_blocks, max_model_len=rc.max_model_len,
                                    batch_sizes=rc.decode_graph_batch_sizes, capture=rc.decode_graphs == "cuda")
    if workers is not None:
        workers.wait_for("ready")
    return pool, states, runner


class Workers:
    """Rank 0's handle on the worker processes (ranks 1..W-1) of a tensor-parallel engine.

    ``Workers(model_path, world_size, device, dtype)`` starts them and joins the process group
    (``self.tp`` is rank 0's ``TensorParallel``); each worker then loads its share of the checkpoint.
    """

    def __init__(self, model_path, world_size: int, device: torch.device | str, dtype=None,
                 quantization: str | None = None):
        import torch.multiprocessing as mp

        if world_size < 2:
            raise ValueError(f"Workers needs a tensor_parallel_size of at least 2; got {world_size}")
        device = torch.device(device)
        for rank in range(world_size):
            rank_device(device, rank)  # every rank's GPU exists
        ctx = mp.get_context("spawn")  # CUDA and threads do not survive fork
        port = _free_port()
        self.world_size = world_size
        self.procs, self.conns = [], []
        threads = max(1, (os.cpu_count() or 1) // world_size)
        for rank in range(1, world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"moonlet-tp{rank}", daemon=True,
                               args=(rank, world_size, port, str(model_path), str(rank_device(device, rank)),
                                     dtype, quantization, threads, child))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        self.tp = self._wait(lambda: TensorParallel.connect(0, world_size, HOST, port, device), "join the group")

    # ---- start-up -------------------------------------------------------------------------------
    def _wait(self, fn, what: str):
        """Run ``fn`` (which blocks on the workers) while watching that none of them dies."""
        result, error = [], []

        def target():
            try:
                result.append(fn())
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                error.append(e)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while thread.is_alive():
            thread.join(0.2)
            self.check(f"while waiting to {what}")
            if time.monotonic() > deadline:
                self.close()
                raise WorkerError(f"tensor-parallel workers did not {what} within {STARTUP_TIMEOUT_S} s")
        if error:
            self.close()
            raise error[0]
        return result[0]

    def wait_for(self, kind: str) -> list:
        """Each worker's next message, which must be ``(kind, ...)``; a worker's error is raised here."""
        replies = []
        for rank, conn in enumerate(self.conns, start=1):
            while not conn.poll(0.2):
                self.check(f"while waiting for rank {rank} to be {kind}")
            message = conn.recv()
            if message[0] == "error":
                self.close()
                raise WorkerError(f"tensor-parallel rank {rank} failed: {message[1]}")
            if message[0] != kind:
                self.close()
                raise WorkerError(f"tensor-parallel rank {rank} sent {message[0]!r}, expected {kind!r}")
            replies.append(message[1:])
        return replies

    def init_runners(self, rc) -> None:
        """Tell the workers the resolved engine settings: they build their pools, runners and graphs."""
        self._send(("init", rc))

    # ---- steps ----------------------------------------------------------------------------------
    def send_step(self, step) -> None:
        self._send(("step", step))

    def _send(self, message) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(message)
            except (BrokenPipeError, ConnectionError, EOFError, OSError):
                self.check("when sending it a step")
                raise WorkerError(f"tensor-parallel rank {rank} no longer takes messages") from None

    def failed(self, error: BaseException) -> None:
        """Rank 0's share of a step raised ``error``: when a worker failed too (it is what usually breaks
        a collective), raise WorkerError with its message; else stop the workers (they wait in a
        collective rank 0 will never join) and let ``error`` propagate."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for rank, conn in enumerate(self.conns, start=1):
                if conn.poll():
                    message = conn.recv()
                    if message[0] == "error":
                        self.close()
                        raise WorkerError(f"tensor-parallel rank {rank} failed: {message[1]}") from error
            if any(proc.exitcode is not None for proc in self.procs):
                self.check("during a step")
            time.sleep(0.05)
        self.close()

    def check(self, when: str = "") -> None:
        """Raise WorkerError (and stop the others) if a worker has exited."""
        for rank, proc in enumerate(self.procs, start=1):
            if proc.exitcode is not None:
                self.close()
                raise WorkerError(f"tensor-parallel rank {rank} exited with code {proc.exitcode}"
                                  + (f" {when}" if when else "") + "; its error is printed above")

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()


def _stop(procs, conns) -> None:
    for conn in conns:
        try:
            conn.send(("stop",))
        except (BrokenPipeError, ConnectionError, EOFError, OSError):
            pass
    for proc in procs:
        proc.join(5)
        if proc.exitcode is None:
            proc.terminate()
            proc.join(5)
    for conn in conns:
        conn.close()


def _worker_main(rank: int, world_size: int, port: int, model_path: str, device: str, dtype,
                 quantization: str | None, threads: int, conn) -> None:
    """A worker process: join the group, load this rank's share, build the runner, run steps until told
    to stop. Errors are reported to rank 0 and end the process."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        tp = TensorParallel.connect(rank, world_size, HOST, port, device)
        from ..kernels.moe import fuse_moe_experts
        from ..weights import load_model
        from .core import _as_dtype

        quantized = quantization or ("keep" if device.type == "cuda" else "dequantize")  # as rank 0 decides
        model = load_model(model_path, device=device, dtype=_as_dtype(dtype), quantized=quantized,
                           tensor_parallel=tp).eval()
        fuse_moe_experts(model)
        conn.send(("loaded",))
        message = conn.recv()
        if message[0] == "stop":
            return
        rc = message[1]
        rc.device = device
        _, _, runner = build_runner(model, rc)
        conn.send(("ready",))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                return
            runner.run(message[1])
    except EOFError:  # rank 0 went away
        return
    except BaseException:  # noqa: BLE001 - reported, then the process ends
        text = traceback.format_exc()
        print(f"moonlet tensor-parallel rank {rank}:\n{text}", flush=True)
        try:
            conn.send(("error", text.strip().splitlines()[-1]))
        except (BrokenPipeError, ConnectionError, OSError):
            pass
        os._exit(1)
