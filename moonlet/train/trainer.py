"""The training loop: MuonClip (or AdamW), accumulation, clipping, schedules, eval, checkpoints, resume,
data parallelism over torch.distributed.

Launch with ``moonlet train`` (one process) or ``torchrun --nproc-per-node N -m moonlet train ...``
(one process per rank; gloo on CPU, nccl on GPU). Every rank packs the same global batch and keeps
its slice of rows; after the micro-batches of a step the gradients are summed across ranks (the
loss is normalized by the global number of target tokens, so the sum is the gradient of the global
mean). With ``shard_optimizer`` (the default) the optimizer state is partitioned over the ranks
(ZeRO-1, :class:`~moonlet.train.distributed.ShardedMuonClip`): gradients are reduce-scattered to
each parameter's owner, owners update their parameters and the results are all-gathered; without
it the gradients are all-reduced and every rank runs the whole optimizer. Either way every rank
ends the step with the same parameters, QK-Clip (maxima all-reduced with MAX) and router-bias
update (loads all-reduced with SUM), and the result equals one process running the whole global
batch.

With ``lora`` set, a checkpoint holds a PEFT adapter (``moonlet.model.lora.save_adapter``) instead of
the model, plus the same trainer state; the base weights come from ``init_from`` (or the seed).

A checkpoint is a hub-layout model directory (``moonlet.weights.save_model``, float32) plus
``trainer_state.pt`` (optimizer, loader, step) and, when the config names one, the tokenizer files.
With a sharded optimizer each rank writes its shard as ``optimizer-RRRRR-of-WWWWW.pt`` beside it
instead; a resume at any world size (one process included) merges what it needs from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import Transformer
from .balance import LoadBalancer
from .data import PackedLoader, TokenDataset
from .distributed import ShardedMuonClip, all_reduce_grads, read_optimizer_shards, shard_file_name
from .muonclip import MuonClip, param_groups, set_max_logit_recording
from .schedule import lr_multiplier

STATE_NAME = "trainer_state.pt"
# copied from tokenizer_dir into every checkpoint; agent_profile.json (the tools and system prompt a model
# was trained with, read by `moonlet agent`) comes along when tokenizer_dir is a model such as init_from
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "agent_profile.json")


@dataclass
class TrainConfig:
    """Everything a run needs. ``model`` holds config.json fields (or {"preset": name})."""
    model: dict = field(default_factory=dict)
    train_data: str = ""
    eval_data: str | None = None
    out_dir: str = "runs/moonlet"
    tokenizer_dir: str | None = None  # copied into every checkpoint
    # start from these weights (fresh optimizer, loader, step): a checkpoint, a run's out_dir, a model
    # directory (an export), or "moonlet-tiny" for the bundled model; see resolve_init
    init_from: str | None = None
    seq_len: int = 256
    batch_size: int = 8  # global rows per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    optimizer: str = "muonclip"  # muonclip | muon (no clip) | adamw
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    qk_clip_tau: float = 100.0
    schedule: str = "wsd"
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bias_update_speed: float = 1e-3
    aux_loss_alpha: float = 0.0
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    shard_optimizer: bool = True  # with > 1 rank: partition optimizer state over ranks (ZeRO-1)
    # DeepSeek-V3's multi-token prediction: > 0 trains the config's MTP layer (num_nextn_predict_layers
    # 1) on the token after next, its loss weighted by this (DeepSeek-V3: 0.3, later 0.1); the layer
    # shares the embedding and output head and is saved with the model (moonlet.weights.save_mtp)
    mtp_loss_weight: float = 0.0
    # LoRA fine-tuning (moonlet.model.lora): {"r", "alpha", "dropout", "targets", "experts"} (LoraSettings'
    # fields; {} takes its defaults). The base model is frozen (bit for bit: no QK-Clip, no router-bias
    # update), only the low-rank factors train, with AdamW whatever ``optimizer`` says, and checkpoints
    # hold the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors) instead of the model
    lora: dict | None = None
    # Packed documents attend only to themselves (positions restart per piece, a target in the next piece
    # is not counted) instead of packing under one causal mask; dense MLA layers mask, KDA and MoBA layers
    # run each piece in a row of its own (moonlet.model.packing)
    document_mask: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(names)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib

            return cls.from_dict(tomllib.loads(text))
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self) -> ModelConfig:
        """``model`` as a ModelConfig; an empty ``model`` with ``init_from`` set means that checkpoint's
        config.json (fine-tuning)."""
        if not self.model and self.init_from:
            return ModelConfig.from_pretrained(resolve_init(self.init_from))
        if "preset" in self.model:
            return ModelConfig.from_pretrained(self.model["preset"]).replace(
                **{k: v for k, v in self.model.items() if k != "preset"})
        return ModelConfig.from_dict(self.model)


def _init_distributed() -> tuple[int, int]:
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Builds the model, optimizer and loaders from a TrainConfig; ``train()`` runs to ``max_steps``
    (resuming from ``resume`` if given) and returns the metric records it logged."""

    def __init__(self, config: TrainConfig, resume: str | os.PathLike | None = None, quiet: bool = False):
        self.cfg = config
        self.rank, self.world = _init_distributed()
        self.quiet = quiet or self.rank != 0
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.device == "auto":
            self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        self.autocast = self.device.type == "cuda"  # bf16 autocast on GPU, float32 on CPU
        self.out = Path(config.out_dir)
        torch.manual_seed(config.seed)

        self.model_config = config.model_config().replace(torch_dtype="float32")
        self.model = Transformer(self.model_config).init_weights(seed=config.seed).to(self.device).train()
        if config.init_from:
            init = resolve_init(config.init_from)
            self._load_weights(init)
            if config.tokenizer_dir is None and (init / "tiktoken.model").is_file():
                config.tokenizer_dir = str(init)  # checkpoints carry the tokenizer they were trained with
        self.mtp = None
        self.lora = None
        if config.lora is not None:
            self.lora = self._add_lora()
        trained: nn.Module = self.model
        if config.mtp_loss_weight:
            self.mtp = self._build_mtp(init if config.init_from else None)
            trained = nn.ModuleDict({"model": self.model, "mtp": self.mtp})  # shared tensors counted once
        self.trained = trained
        if config.optimizer not in ("muonclip", "muon", "adamw"):
            raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'muonclip', 'muon' or 'adamw'")
        # LoRA: AdamW on the factors only; QK-Clip and the router-bias update would change the frozen base
        optimizer = "adamw" if self.lora is not None else config.optimizer
        self.attn = set_max_logit_recording(trained, optimizer == "muonclip")
        self.balancer = LoadBalancer(trained, 0.0 if self.lora is not None else config.bias_update_speed,
                                     config.aux_loss_alpha)
        groups = param_groups(trained, config.weight_decay, muon=optimizer in ("muonclip", "muon"))
        self.sharded = self.world > 1 and config.shard_optimizer
        self.optimizer = (ShardedMuonClip if self.sharded else MuonClip)(
            groups, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, attention_modules=self.attn,
            qk_clip_tau=config.qk_clip_tau if optimizer == "muonclip" else None)

        dataset = TokenDataset(config.train_data)
        if dataset.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"dataset vocabulary ({dataset.vocab_size}) is larger than the model's "
                             f"({self.model_config.vocab_size})")
        self.loader = PackedLoader(dataset, config.seq_len, config.batch_size, config.seed, self.rank, self.world,
                                   document_mask=config.document_mask)
        self.eval_dataset = TokenDataset(config.eval_data) if config.eval_data else None
        self.step = 0
        self.clipped_heads = 0  # head-steps QK-Clip touched
        self.head_steps = 0
        self.metrics: list[dict] = []
        if resume:
            self.load_checkpoint(resume)

    def _add_lora(self):
        """Wrap the configured linears with LoRA factors (seeded) and freeze everything else."""
        from ..model.lora import LoraSettings, add_lora, freeze_base

        if self.cfg.mtp_loss_weight:
            raise ValueError("lora and mtp_loss_weight together are not supported: the MTP layer would train in "
                             "full; set mtp_loss_weight to 0 for a LoRA run")
        settings = LoraSettings.from_dict(self.cfg.lora)
        settings.base_model_name_or_path = self.cfg.init_from
        add_lora(self.model, settings, seed=self.cfg.seed)
        freeze_base(self.model)
        return settings

    def _build_mtp(self, init: Path | None):
        """The MTP layer to train: random (seeded), or the one ``init`` carries; its embedding and
        output head are the model's own tensors (DeepSeek-V3 shares them)."""
        from ..model.mtp import MTPHead

        cfg = self.model_config
        if cfg.num_nextn_predict_layers != 1:
            raise ValueError(f"mtp_loss_weight={self.cfg.mtp_loss_weight} trains one MTP layer: set the model "
                             f"config's num_nextn_predict_layers to 1 (it is {cfg.num_nextn_predict_layers})")
        if self.cfg.mtp_loss_weight < 0:
            raise ValueError(f"mtp_loss_weight={self.cfg.mtp_loss_weight} must be >= 0")
        head = MTPHead(cfg).init_weights(seed=self.cfg.seed + 1).to(self.device)
        if init is not None and any(self._mtp_keys(init)):
            from ..weights import load_mtp

            head.load_state_dict(load_mtp(init, dtype=torch.float32).state_dict())
        layer = head.layers[0]
        layer.embed_tokens.weight = self.model.model.embed_tokens.weight
        layer.shared_head.head.weight = self.model.lm_head.weight
        return head.train()

    def _mtp_keys(self, path: Path):
        """Names of the MTP layers' tensors in the checkpoint at ``path`` (from its index, if any)."""
        from ..weights import INDEX_NAME

        index = path / INDEX_NAME
        if not index.is_file():
            return []
        first = self.model_config.num_hidden_layers
        return [k for k in json.loads(index.read_text())["weight_map"] if k.startswith(f"model.layers.{first}.")]

    # ---- one step -------------------------------------------------------------------------------
    def _ctx(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def _packing(self, batch: dict) -> dict:
        """The model's packed-document arguments for a batch (none without ``document_mask``)."""
        if "segments" not in batch:
            return {}
        return {"positions": batch["positions"].to(self.device), "segment_ids": batch["segments"].to(self.device)}

    def _micro_loss(self, batch: dict, global_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of masked token losses / global target count (backpropagated), and the raw sum."""
        inputs = batch["inputs"].to(self.device)
        targets = batch["targets"].to(self.device)
        mask = batch["mask"].to(self.device)
        packing = self._packing(batch)
        with self._ctx():
            hidden = self.model.hidden_states(inputs, **packing)
            logits = self.model.lm_head(hidden)
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        total = (losses * mask.reshape(-1)).sum()
        loss = total / max(global_targets, 1)
        if self.mtp is not None:  # row i predicts the token after next: targets shifted by one more
            with self._ctx():
                mlogits = self.mtp.forward_train(self.model.model.rotary_emb, hidden, inputs, **packing)
            mlosses = F.cross_entropy(mlogits.float().reshape(-1, mlogits.shape[-1]), targets[:, 1:].reshape(-1),
                                      reduction="none")
            mmask = mask[:, 1:]
            if "segment_ids" in packing:  # row i combines tokens i and i + 1: both in one piece
                seg = packing["segment_ids"]
                mmask = mmask * (seg[:, :-1] == seg[:, 1:])
            mtotal = (mlosses * mmask.reshape(-1)).sum()
            loss = loss + self.cfg.mtp_loss_weight * mtotal / max(global_targets, 1)
            self._mtp_sum = getattr(self, "_mtp_sum", 0.0) + float(mtotal.detach())
        if self.cfg.aux_loss_alpha > 0:
            # the aux loss is a per-rank mean; divide by world so the summed gradient is its mean
            loss = loss + self.balancer.aux_loss(inputs.shape[0]) / (self.cfg.grad_accum * self.world)
        self.balancer.observe()
        return loss, total.detach()

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = cfg.lr * lr_multiplier(self.step, cfg.max_steps, cfg.schedule, cfg.warmup_steps, cfg.decay_fraction,
                                    cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
        global_targets = sum(b["global_targets"] for b in batches)
        loss_sum = torch.zeros((), device=self.device)
        for batch in batches:
            loss, total = self._micro_loss(batch, global_targets)
            loss.backward()
            loss_sum += total
        if self.world > 1:
            if self.sharded:
                self.optimizer.reduce_gradients()  # each owner gets the sums of its parameters' gradients
            else:
                all_reduce_grads([p for p in self.trained.parameters() if p.requires_grad])
            dist.all_reduce(loss_sum)
        grad_norm = self.optimizer.clip_grad_norm_(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance = self.balancer.step()
        clip = self.optimizer.last_clip
        n_clipped = sum(len(c["clipped"]) for c in clip)
        self.clipped_heads += n_clipped
        self.head_steps += sum(len(c["max_logit"]) for c in clip)
        self.step += 1
        tokens = cfg.seq_len * cfg.batch_size * cfg.grad_accum
        rec = {"step": self.step, "loss": float(loss_sum) / max(global_targets, 1), "lr": lr,
               "grad_norm": float(grad_norm), "tokens": self.step * tokens, "targets": global_targets,
               "step_s": time.perf_counter() - t0, "max_violation": balance["max_violation"]}
        if clip:
            rec["max_logit"] = max(max(c["max_logit"]) for c in clip)
            rec["clipped_heads"] = n_clipped
        if self.mtp is not None:  # this rank's MTP loss per target (the main loss is global)
            rec["mtp_loss"] = self._mtp_sum / max(global_targets / self.world, 1)
            self._mtp_sum = 0.0
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss became {rec['loss']} at step {self.step}; lower lr or check the data")
        return rec

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean masked loss over the first ``eval_batches`` batches of the eval data (fixed order)."""
        if self.eval_dataset is None:
            return None
        self.model.eval()
        loader = PackedLoader(self.eval_dataset, self.cfg.seq_len, self.cfg.batch_size, seed=1234, rank=self.rank,
                              world_size=self.world, document_mask=self.cfg.document_mask)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.eval_batches):
            b = loader.next_batch()
            with self._ctx():
                logits = self.model(b["inputs"].to(self.device), **self._packing(b))
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b["targets"].to(self.device).reshape(-1),
                                     reduction="none")
            m = b["mask"].to(self.device).reshape(-1)
            total += torch.stack([(losses * m).sum().double(), m.sum().double()])
        for a in self.attn:
            a.max_logit = None  # eval forwards do not count for QK-Clip
        for r in self.balancer.routers:
            r.last_scores = r.last_indices = None
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1].clamp(min=1))

    # ---- the loop -------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> list[dict]:
        """Train until step ``max_steps`` (default: the config's), logging and checkpointing."""
        cfg = self.cfg
        stop = cfg.max_steps if max_steps is None else max_steps
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        log = open(self.out / "metrics.jsonl", "a", encoding="utf-8") if self.rank == 0 else None
        start_time, start_step = time.perf_counter(), self.step
        try:
            while self.step < stop:
                rec = self.train_step()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    rec["eval_loss"] = self.evaluate()
                self.metrics.append(rec)
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if not self.quiet and (self.step % cfg.log_every == 0 or "eval_loss" in rec or self.step == stop):
                    self._progress(rec, start_time, start_step, stop)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint(self.out / "checkpoints" / f"step-{self.step:06d}")
        finally:
            if log:
                log.close()
        if self.rank == 0 and self.metrics:
            from .plot import plot_metrics

            plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
        return self.metrics

    def _progress(self, rec: dict, start_time: float, start_step: int, stop: int) -> None:
        done = self.step - start_step
        elapsed = time.perf_counter() - start_time
        eta = elapsed / max(done, 1) * (stop - self.step)
        width = 24
        filled = int(width * self.step / max(stop, 1))
        bar = "#" * filled + "." * (width - filled)
        extra = f" eval {rec['eval_loss']:.4f}" if rec.get("eval_loss") is not None else ""
        tok_s = done * self.cfg.seq_len * self.cfg.batch_size * self.cfg.grad_accum / max(elapsed, 1e-9)
        print(f"[{bar}] step {self.step}/{stop} loss {rec['loss']:.4f}{extra} lr {rec['lr']:.2e} "
              f"gnorm {rec['grad_norm']:.2f} {tok_s:.0f} tok/s eta {eta / 60:.1f}m", file=sys.stderr, flush=True)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Model (hub layout, float32) + trainer state (+ tokenizer files) under ``path``. Rank 0
        writes all of it, except that with a sharded optimizer every rank writes its own shard
        (collective: every rank must call this)."""
        path = Path(path)
        if self.sharded:
            if self.rank == 0:
                path.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            torch.save(self.optimizer.state_dict(), path / shard_file_name(self.rank, self.world))
            dist.barrier()  # every shard is on disk before rank 0 marks the checkpoint complete
        if self.rank == 0:
            from ..weights import save_model

            if self.lora is not None:
                from ..model.lora import save_adapter

                path.mkdir(parents=True, exist_ok=True)
                save_adapter(self.model, path)
            else:
                save_model(self.model, path)
            if self.mtp is not None:
                from ..weights import save_mtp

                save_mtp(self.mtp, self.model, path)
            current = {shard_file_name(r, self.world) for r in range(self.world)} if self.sharded else set()
            for old in path.glob("optimizer-*-of-*.pt"):  # shards of an earlier save into this directory
                if old.name not in current:
                    old.unlink()
            torch.save({"step": self.step, "optimizer": None if self.sharded else self.optimizer.state_dict(),
                        "optimizer_shards": self.world if self.sharded else 0,
                        "loader": self.loader.state_dict(), "clipped_heads": self.clipped_heads,
                        "head_steps": self.head_steps, "config": self.cfg.to_dict()}, path / STATE_NAME)
            copy_tokenizer(self.cfg.tokenizer_dir, path)
            (path.parent / "latest").write_text(path.name + "\n")
            self._prune(path.parent)
        if self.world > 1:
            dist.barrier()
        return path

    def _prune(self, directory: Path) -> None:
        if self.cfg.keep_checkpoints <= 0:
            return
        steps = sorted(p for p in directory.glob("step-*") if (p / STATE_NAME).is_file())
        for old in steps[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old)

    def _load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        from ..model.lora import ADAPTER_CONFIG_NAME

        if (path / ADAPTER_CONFIG_NAME).is_file():
            if getattr(self, "lora", None) is not None:  # resuming a LoRA run: the factors; the base came from init_from
                self._load_lora_factors(path)
                return
            raise ValueError(f"{path} is a LoRA adapter checkpoint, not a model: start from its base model with "
                             f"the same lora settings, or merge it first (moonlet.train.trainer.merge_lora_checkpoint)")
        state_dict = {}
        for f in sorted(path.glob("*.safetensors")):
            state_dict.update(load_file(str(f)))
        mtp_prefix = f"model.layers.{self.model_config.num_hidden_layers}."
        mtp_state = {k: v for k, v in state_dict.items() if k.startswith(mtp_prefix)}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(mtp_prefix)}
        if getattr(self, "mtp", None) is not None and mtp_state:  # tied tensors come from the model's
            mtp_state = {k: v for k, v in mtp_state.items() if not k.endswith((".embed_tokens.weight",
                                                                               ".shared_head.head.weight"))}
            self.mtp.load_state_dict(mtp_state, strict=False)
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    @torch.no_grad()
    def _load_lora_factors(self, path: Path) -> None:
        from ..model.lora import lora_modules, read_adapter

        adapter = read_adapter(path, self.model_config.model_type)
        modules = lora_modules(self.model)
        if set(adapter.factors) != set(modules):
            raise ValueError(f"LoRA checkpoint {path} adapts {len(adapter.factors)} modules but this run's lora "
                             f"settings select {len(modules)}; resume with the run's own lora settings "
                             f"({sorted(set(adapter.factors) ^ set(modules))[:3]} differ)")
        for name, (a, b) in adapter.factors.items():
            m = modules[name]
            if a.shape != m.lora_A.weight.shape or b.shape != m.lora_B.weight.shape:
                raise ValueError(f"LoRA checkpoint {path}: {name} has rank {a.shape[0]}, this run's r is {m.r}")
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)

    def export_lora(self, path: str | os.PathLike, merged: bool = False) -> Path:
        """Write the trained adapter (PEFT format, + tokenizer files) to ``path``; with ``merged`` a
        full hub-layout checkpoint (float32) of the base with the adapter folded in instead, which
        anything that loads a moonlet checkpoint can serve. The trainer's model is left as it is."""
        import copy

        from ..model.lora import merge_lora, save_adapter
        from ..weights import save_model

        if self.lora is None:
            raise ValueError("export_lora: this run has no lora settings (TrainConfig.lora)")
        path = Path(path)
        if merged:
            save_model(merge_lora(copy.deepcopy(self.model)), path)
        else:
            save_adapter(self.model, path)
        copy_tokenizer(self.cfg.tokenizer_dir, path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, loader and step from a checkpoint directory (or a run's out_dir,
        meaning its latest checkpoint)."""
        path = resolve_checkpoint(path)
        self._load_weights(path)
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
        shards = int(state.get("optimizer_shards", 0))
        if shards:  # written by a sharded optimizer at any world size: keep what this rank owns
            keep = (lambda i: self.optimizer.owned[i]) if self.sharded else None
            self.optimizer.load_state_dict(read_optimizer_shards(path, shards, keep))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.clipped_heads = int(state.get("clipped_heads", 0))
        self.head_steps = int(state.get("head_steps", 0))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return path / "checkpoints" / latest.read_text().strip()
    raise FileNotFoundError(f"no checkpoint at {path}: expected {STATE_NAME} there or checkpoints/latest under it")


def resolve_init(path: str | os.PathLike) -> Path:
    """What ``init_from`` names: a checkpoint (``trainer_state.pt``), a run's out_dir (its latest
    checkpoint), a model directory with config.json and safetensors (an export such as
    ``moonlet/assets/moonlet-tiny``), or the name ``moonlet-tiny`` for the bundled checkpoint."""
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError:
        pass
    p = Path(path)
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return p
    from ..assets import DEFAULT_MODEL, default_model_path

    if str(path) == DEFAULT_MODEL and not p.exists():
        return default_model_path()
    raise FileNotFoundError(f"init_from {str(path)!r} is neither a checkpoint ({STATE_NAME}, or checkpoints/latest "
                            f"under a run directory) nor a model directory (config.json + *.safetensors), nor "
                            f"{DEFAULT_MODEL!r} (the bundled model)")


def merge_lora_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                          dtype: torch.dtype | str | None = None) -> Path:
    """A full checkpoint at ``out``: the model at ``base`` (a model directory, a checkpoint or
    "moonlet-tiny") with the LoRA ``adapter`` directory merged in (``load_model(lora=...)``), saved
    with ``save_model`` in ``dtype`` (default float32), plus the base's tokenizer files."""
    from ..weights import load_model, save_model

    base = resolve_init(base)
    model = load_model(base, dtype=torch.float32, lora=adapter)
    out = Path(out)
    save_model(model, out, dtype=dtype)
    copy_tokenizer(base, out)
    return out


def copy_tokenizer(tokenizer_dir: str | os.PathLike | None, dest: Path) -> None:
    if not tokenizer_dir:
        return
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
