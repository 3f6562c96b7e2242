"""EngineCore: the synchronous engine (add requests, step, abort, stats) shared by LLM and AsyncLLM."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..kernels.moe import fuse_moe_experts
from .cache import KVCacheManager
from .config import EngineConfig, resolve
from .errors import PromptTooLongError
from .multimodal import MultimodalPrompt, RequestImages, VisionInputs
from .parallel import build_runner
from .params import SamplingParams
from .processors import LogitProcessors, bad_word_token_ids
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence
from .draft import DraftModelProposer, build_draft_runner, check_draft_model
from .mtp import MTPProposer, build_mtp_runner
from .spec import NgramProposer
from .structured import GrammarCache, StructuredOutputError
from .thinking import ThinkingBudget, thinking_markers

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_model_path(model_path: str | os.PathLike | None) -> Path:
    """``model_path``, or the bundled moonlet-tiny checkpoint when None."""
    if model_path is not None:
        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"model path {str(path)!r} is not a directory; give a checkpoint directory "
                                    f"holding config.json and safetensors shards")
        return path
    try:
        from ..assets import default_model_path
    except ImportError:
        raise FileNotFoundError("no model_path given and the bundled moonlet-tiny model is not part of this "
                                "install yet; pass a checkpoint directory") from None
    return Path(default_model_path())


def load_model_and_tokenizer(model_path, device: str | None, dtype, quantization: str | None = None,
                             tensor_parallel=None, lora=None) -> tuple[torch.nn.Module, object, str]:
    """Load a checkpoint directory (and its tokenizer, when it ships one). Returns (model, tokenizer, name).
    A config with a ``vision_config`` (K2.5 / K2.6) gives a ``VisionLanguageModel`` (vision tower,
    projector and text model); any other the text ``Transformer``. ``quantization`` ("keep" or
    "dequantize", EngineConfig's): what happens to quantized weights (default: keep on CUDA).
    ``tensor_parallel``: load rank 0's share of the text model (``moonlet.parallel``). ``lora``: a PEFT
    LoRA adapter directory merged into the loaded weights (quantized ones are then dequantized)."""
    path = resolve_model_path(model_path)
    from ..config import ModelConfig
    from ..weights import load_model, load_vision_language_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantized = quantization or ("keep" if torch.device(device).type == "cuda" and lora is None else "dequantize")
    if ModelConfig.from_pretrained(path).vision_config is not None:
        model = load_vision_language_model(str(path), device=device, dtype=_as_dtype(dtype), quantized=quantized,
                                           tensor_parallel=tensor_parallel, lora=lora)
    else:
        model = load_model(str(path), device=device, dtype=_as_dtype(dtype), quantized=quantized,
                           tensor_parallel=tensor_parallel, lora=lora)
    tokenizer = None
    if (path / "tiktoken.model").is_file():
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(str(path))
    return model, tokenizer, path.name


def build_engine(model_path=None, model=None, tokenizer=None, image_processor=None, **engine_args) -> "EngineCore":
    """An EngineCore for a checkpoint directory (None: the bundled moonlet-tiny), or for a model and
    tokenizer object already built. ``engine_args`` are EngineConfig fields. ``image_processor``
    (a ``moonlet.multimodal.ImageProcessorConfig``) for vision models: default, the checkpoint's
    preprocessor_config.json, else the published K2.5 values at the vision_config's patch size."""
    config = EngineConfig.from_kwargs(**engine_args)
    name = None
    workers = None
    if config.tensor_parallel_size > 1 and model is not None:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} loads each rank's share of the "
                         "checkpoint in its own process: pass model_path (a checkpoint directory), not a model object")
    if config.lora is not None and model is not None:
        raise ValueError(f"engine argument lora={str(config.lora)!r} is merged while loading a checkpoint: pass "
                         "model_path, or merge it into the model object yourself (moonlet.model.lora.merge_adapter)")
    if model is None:
        config.validate()
        device = config.device
        if config.tensor_parallel_size > 1:  # start the other ranks first: they load their shares meanwhile
            from .parallel import Workers

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            workers = Workers(resolve_model_path(model_path), config.tensor_parallel_size, device, config.dtype,
                              config.quantization)
        try:
            model, loaded_tokenizer, name = load_model_and_tokenizer(model_path, device, config.dtype,
                                                                     config.quantization,
                                                                     workers.tp if workers is not None else None,
                                                                     lora=config.lora)
            if workers is not None:
                workers.wait_for("loaded")
        except BaseException:
            if workers is not None:
                workers.close()
            raise
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if image_processor is None and getattr(model, "vision_tower", None) is not None:
            from ..multimodal import ImageProcessorConfig

            image_processor = ImageProcessorConfig.from_pretrained(resolve_model_path(model_path))
    try:
        return EngineCore(model, tokenizer, config, model_name=name, image_processor=image_processor, workers=workers,
                          model_path=resolve_model_path(model_path) if name is not None else None)
    except BaseException:
        if workers is not None:
            workers.close()
        raise


class EngineCore:
    """Owns model, cache pool, scheduler, runner and sampler. Not thread-safe: one caller at a time
    (AsyncLLM runs it on its own thread)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, config: EngineConfig | None = None,
                 model_name: str | None = None, image_processor=None, workers=None, model_path=None):
        """``model_path``: the checkpoint directory the model came from, if any (a draft model's
        tokenizer file is checked against its)."""
        config = config or EngineConfig()
        self.workers = workers  # tensor parallelism: moonlet.engine.parallel.Workers (ranks 1..W-1)
        self.vision: VisionInputs | None = None
        if getattr(model, "vision_tower", None) is not None:  # a VisionLanguageModel: run its text model
            vlm, model = model, model.language_model
            if config.device is not None:
                vlm.vision_tower.to(config.device)
                vlm.mm_projector.to(config.device)
            dtype = _as_dtype(config.dtype)
            if dtype is not None:
                vlm.vision_tower.to(dtype)
                vlm.mm_projector.to(dtype)
            self.vision = VisionInputs(vlm.eval(), image_processor, cache_bytes=config.image_cache_bytes())
        if config.device is not None and torch.device(config.device) != model.device:
            model = model.to(config.device)
        dtype = _as_dtype(config.dtype)
        if dtype is not None and dtype != model.dtype:
            model = model.cast(dtype)
        self.model = model.eval()
        if self.vision is not None:
            self.vision.vlm.language_model = self.model
        if config.lora_enabled:  # shared experts stay dense MLPs, so that adapters on their linears apply
            for module in self.model.modules():
                if hasattr(module, "shared_apart"):
                    module.shared_apart = True
        fuse_moe_experts(self.model)  # grouped-GEMM MoE for inference, on every device (after any cast)
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.draft_model = None
        self.mtp = None
        if config.speculative == "draft":  # before sizing the pool: its weights and latents take memory too
            self.draft_model = self._load_draft(config, model_path)
        elif config.speculative == "mtp":
            self.mtp = self._load_mtp(config, model_path)
        self.config = resolve(config, model.config, model.device, model.dtype,
                              draft_config=self.draft_model.config if self.draft_model is not None else None,
                              extra_latent_layers=1 if self.mtp is not None else 0)
        rc = self.config
        self.model_name = config.model_name or model_name or "moonlet"
        hybrid = bool(model.config.kda_layer_ids)
        self.cache = KVCacheManager(rc.num_blocks, rc.block_size, rc.enable_prefix_caching,
                                    state_slots=rc.max_num_seqs if hybrid else 0, state_snapshots=rc.state_snapshots,
                                    host_blocks=rc.host_blocks)
        self.lora = None  # multi-LoRA serving: adapters by name, resident slots, per-token LoRA (MultiLora)
        if config.lora_enabled:
            from .lora import MultiLora

            self.lora = MultiLora(self.model, config.max_loras, config.max_lora_rank)
            for name, path in (config.lora_modules or {}).items():
                self.lora.add(name, path)
        self.pool, _, self.runner = build_runner(self.model, rc, workers, lora=self.lora)
        self.proposer = None
        if self.draft_model is not None:
            self.proposer = DraftModelProposer(rc.speculative, rc.max_model_len, build_draft_runner(self.draft_model, rc),
                                               self.cache, rc.max_num_batched_tokens)
        elif self.mtp is not None:
            from ..model.mtp import MTPDrafter

            self.proposer = MTPProposer(rc.speculative, rc.max_model_len,
                                        build_mtp_runner(MTPDrafter(self.mtp), rc),
                                        self.cache)
            self.runner.keep_hidden = True  # the MTP layer reads every step's hidden states
        elif rc.speculative is not None:
            self.proposer = NgramProposer(rc.speculative, rc.max_model_len)
        self.scheduler = Scheduler(self.cache, rc.max_num_seqs, rc.max_num_batched_tokens, rc.enable_chunked_prefill,
                                   proposer=self.proposer, spec_state_rows=(rc.state_snapshots, rc.spec_state_rows),
                                   lora=self.lora, policy=rc.scheduling_policy,
                                   max_lora_wait_steps=config.max_lora_wait_steps)
        self.sampler = Sampler(model.device, rc.seed)
        self.requests: dict[str, Sequence] = {}  # unfinished requests (sample 0's sequence when n > 1)
        self.samples: dict[str, list[Sequence]] = {}  # request id -> its unfinished samples (SamplingParams.n)
        self._grammars: GrammarCache | None = None  # made on the first structured-output request
        self._grammars_lock = threading.Lock()  # requests are checked on worker threads too
        eos = set(model.config.eos_token_ids)
        if tokenizer is not None:
            eos |= set(tokenizer.stop_token_ids)
        self.eos_ids = frozenset(eos)
        self.generation_tokens_total = 0
        self.requests_finished = 0
        self.requests_aborted = 0
        self.num_steps = 0
        self.spec_draft_tokens = 0  # draft tokens verified (speculative decoding)
        self.spec_accepted_tokens = 0  # of those, kept as output tokens
        self.spec_verifications = 0  # sequence-steps that verified at least one draft
        self.disk = None  # the disk tier of the prefix cache (disk_cache_dir); opened last: it locks its directory
        if rc.disk_cache_dir is not None:
            self.disk = self._open_disk_cache(rc, image_processor)

    def _open_disk_cache(self, rc, image_processor):
        """The disk tier for this model and pool (``disk_cache.open_disk_cache``), attached to the cache
        manager (hits, which blocks to write) and the runner (the copies). Image-text models add the vision
        tower's weights and the image preprocessing to the fingerprint: a block of image tokens holds
        latents of their features."""
        from .disk_cache import open_disk_cache

        sums = self.runner.kv.page_sums
        extra_modules, extra = (), None
        if self.vision is not None:
            extra_modules = (self.vision.vlm.vision_tower, self.vision.vlm.mm_projector)
            extra = {"image_processor": repr(image_processor)}
        disk = open_disk_cache(rc.disk_cache_dir, rc.disk_cache_bytes, self.model, self.pool,
                               sums.data.shape[0] if sums is not None else 0, extra_modules, extra)
        self.cache.disk = self.runner.disk = disk
        return disk

    def _load_draft(self, config: EngineConfig, model_path) -> torch.nn.Module:
        """The draft model for ``speculative='draft'``: ``config.speculative_model`` (a loaded model, or
        the checkpoint directory to load), on the target's device and in its dtype, checked against it."""
        config.speculative_config()  # a clear error for a missing or odd value first
        draft_model, draft_path = config.speculative_model, None
        if not isinstance(draft_model, torch.nn.Module):
            draft_path = resolve_model_path(draft_model)
            draft_model, _, _ = load_model_and_tokenizer(draft_path, str(self.model.device), None, config.quantization)
        if getattr(draft_model, "vision_tower", None) is not None:  # drafts text: its language model is enough
            draft_model = draft_model.language_model
        check_draft_model(self.model.config, draft_model.config, model_path, draft_path)
        if draft_model.device != self.model.device:
            draft_model = draft_model.to(self.model.device)
        if draft_model.dtype != self.model.dtype:
            draft_model = draft_model.cast(self.model.dtype)
        draft_model = draft_model.eval()
        fuse_moe_experts(draft_model)
        return draft_model

    def _load_mtp(self, config: EngineConfig, model_path):
        """The MTP layers for ``speculative='mtp'``: ``config.speculative_model`` (an ``MTPHead``, or the
        directory to load them from), else the target checkpoint's own; on its device, in its dtype."""
        from ..model.mtp import MTPHead
        from ..weights import load_mtp

        config.speculative_config()
        if self.model.config.kda_layer_ids:
            raise ValueError("engine argument speculative='mtp': hybrid (KDA) models have no MTP layers")
        head = config.speculative_model
        if not isinstance(head, MTPHead):
            source = head if head is not None else model_path
            if source is None:
                raise ValueError("speculative='mtp' loads the MTP layer from the checkpoint directory: build the engine "
                                 "from a path (or pass the layers as speculative_model=MTPHead)")
            head = load_mtp(resolve_model_path(source), device=self.model.device, dtype=self.model.dtype)
        if len(head.layers) != 1:
            raise ValueError(f"speculative='mtp' supports checkpoints with one MTP layer (DeepSeek-V3's); this one has "
                             f"{len(head.layers)}")
        if head.config.hidden_size != self.model.config.hidden_size or \
                head.config.vocab_size != self.model.config.vocab_size:
            raise ValueError("speculative_model: these MTP layers belong to a model of another hidden size or "
                             "vocabulary")
        return head.to(device=self.model.device, dtype=self.model.dtype).eval()

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any, and finish the disk tier's queued writes and release
        its directory (idempotent; the engine cannot step afterwards)."""
        if self.disk is not None:
            self.disk.close()
        if self.workers is not None:
            self.workers.close()
        if self.lora is not None:  # the LoRA hooks leave the model (it may be the caller's object)
            self.lora.close()

    # ---- LoRA adapters (multi-LoRA serving) ------------------------------------------------------
    def _multi_lora(self):
        if self.lora is None:
            raise ValueError("this engine serves no LoRA adapters: start it with enable_lora=True or lora_modules "
                             "(CLI --enable-lora / --lora-modules NAME=PATH)")
        return self.lora

    def add_lora(self, name: str, path) -> None:
        """Register the PEFT LoRA adapter directory ``path`` under ``name``; requests then select it with
        ``SamplingParams(lora=name)``. It is read and checked now, and copied to the device when a request
        needs it. ValueError when multi-LoRA is off, the name is taken, or the adapter does not fit."""
        self._multi_lora().add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter. ValueError when unknown or while an unfinished request uses it."""
        lora = self._multi_lora()
        lora.get(name)
        users = [rid for rid, seqs in self.samples.items() if any(s.params.lora == name for s in seqs)]
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {len(users)} unfinished request(s) "
                             f"({', '.join(users[:3])}{', ...' if len(users) > 3 else ''}); wait for them or abort "
                             "them first")
        lora.remove(name)

    def list_loras(self) -> dict[str, str]:
        """{name: adapter directory} of the registered adapters (empty when multi-LoRA is off)."""
        return {} if self.lora is None else {n: a.path for n, a in self.lora.adapters.items()}

    @property
    def supports_images(self) -> bool:
        """Whether requests may carry images (the checkpoint has a vision tower)."""
        return self.vision is not None

    def prepare_prompt(self, prompt_token_ids, images) -> MultimodalPrompt:
        """A prompt with images for ``add_request``: the images preprocessed, the i-th run of
        ``<|media_pad|>`` tokens expanded to the i-th image's token count. CPU work only (safe off the
        engine thread). ValueError for a model without vision, unequal counts, unreadable images."""
        if self.vision is None:
            raise ValueError("this model has no vision (its config has no vision_config); send text only")
        return self.vision.prepare(prompt_token_ids, images)

    # ---- requests -------------------------------------------------------------------------------
    @property
    def grammars(self) -> GrammarCache:
        """The structured-output grammar cache (made on first use). Raises ValueError when the grammar
        library is missing (``StructuredOutputUnavailable``) or the engine has no tokenizer."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size)
        return self._grammars

    def check_structured(self, spec) -> None:
        """Compile a ``StructuredOutput`` (cached for the request that follows); StructuredOutputError
        (a ValueError whose ``param`` is ``spec.param``) when it cannot be used (library missing, no
        tokenizer, a schema / regex the library rejects). Takes as long as the compile: callers on an
        event loop run it in a worker thread (``AsyncLLM.generate`` does)."""
        try:
            self.grammars.compile(spec)
        except StructuredOutputError as e:
            if e.param is None:
                e.param = spec.param
            raise
        except ValueError as e:
            raise StructuredOutputError(str(e), spec.param) from None

    def check_request(self, prompt_token_ids, params: SamplingParams) -> list[int]:
        """Validate a request; returns the prompt as a list of ints (a ``MultimodalPrompt``: its expanded
        token ids). Raises ValueError (or PromptTooLongError) saying what is wrong."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams; got {type(params).__name__}")
        multimodal = isinstance(prompt_token_ids, MultimodalPrompt)
        if multimodal:
            if self.vision is None:
                raise ValueError("this model has no vision (its config has no vision_config); send text only")
            prompt_token_ids = prompt_token_ids.token_ids
        try:
            ids = [int(t) for t in prompt_token_ids]
        except (TypeError, ValueError):
            raise ValueError("prompt_token_ids must be a sequence of integer token ids") from None
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
        if len(ids) > self.max_model_len:
            limit = self.max_model_len
            detail = ""
            if limit < self.model_config.max_position_embeddings:
                detail = (f"limited by the KV cache pool of {self.config.num_blocks} blocks x "
                          f"{self.config.block_size} tokens or by max_model_len")
            raise PromptTooLongError(len(ids), limit, detail)
        if self.vision is not None and not multimodal and self.vision.placeholder_id in ids:
            raise ValueError(f"the prompt holds image placeholder tokens ({self.vision.placeholder_id}) but the "
                             "request has no images; pass the images with the prompt")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        if params.lora is not None:
            self._multi_lora().get(params.lora)  # ValueError naming the registered ones
        if params.thinking_token_budget is not None:
            thinking_markers(params, self.tokenizer, vocab)
        if params.structured is not None:
            self.check_structured(params.structured)
        self._check_processors(params, vocab)
        return ids

    def _check_processors(self, params: SamplingParams, vocab: int) -> None:
        """The token ids of logit_bias and allowed_token_ids against the vocabulary, bad_words against
        the tokenizer, and priority against the scheduling policy."""
        for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{name}: token id {outside[0]} is outside the model's vocabulary [0, {vocab})")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words need a tokenizer; this engine has none (use logit_bias with -100, or "
                                 "allowed_token_ids)")
            if params.allowed_token_ids is not None:
                single = {w[0] for w in bad_word_token_ids(self.tokenizer, params.bad_words) if len(w) == 1}
                if set(params.allowed_token_ids) <= single:
                    raise ValueError(f"bad_words ban every token of allowed_token_ids={params.allowed_token_ids}; "
                                     "nothing could be generated")
        if params.priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority={params.priority}: this engine schedules first come, first served "
                             f"(scheduling_policy={self.config.scheduling_policy!r}); start it with "
                             "scheduling_policy='priority' (--scheduling-policy priority) or send priority 0")

    def add_request(self, request_id: str, prompt_token_ids, params: SamplingParams, images=None) -> Sequence:
        """Queue a request. ``prompt_token_ids``: token ids, or a ``MultimodalPrompt`` (``prepare_prompt``);
        ``images`` (vision models): images for the prompt's placeholder runs, in order, prepared here.
        The vision tower does not run here: the steps that compute an image's positions get its features
        (``VisionInputs.provide``), so images inside a prefix-cache hit are never encoded.

        ``params.n > 1`` queues n sequences (samples) under this one request id, each with its own
        decoding state (``params.sample_params(i)``: seed + i), sharing the prompt's computation
        (``Scheduler.add_group``); their outputs carry ``index`` i. Returns sample 0's sequence (all of
        them: ``self.samples[request_id]``, while unfinished)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if images:
            if isinstance(prompt_token_ids, MultimodalPrompt):
                raise ValueError("give images either prepared in a MultimodalPrompt or as images=, not both")
            prompt_token_ids = self.prepare_prompt(prompt_token_ids, images)
        ids = self.check_request(prompt_token_ids, params)
        seqs = [self._new_sequence(request_id, ids, prompt_token_ids, params.sample_params(i), i)
                for i in range(params.n)]
        if params.lora is not None:
            self.lora.get(params.lora).requests += 1
        for seq in seqs[1:]:  # one request's prompt logprobs: computed once, by whichever sample gets there
            seq.prompt_logprobs = seqs[0].prompt_logprobs
        self.requests[request_id] = seqs[0]
        self.samples[request_id] = seqs
        self.scheduler.add_group(seqs)
        return seqs[0]

    def _new_sequence(self, request_id: str, ids: list[int], prompt, params: SamplingParams, index: int) -> Sequence:
        """One sample's Sequence: its own detokenizer, thinking budget, grammar state and image rows."""
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        detok = None
        if self.tokenizer is not None:
            from ..tokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        seq = Sequence(request_id, ids, params, stop_ids, detok, index=index)
        if params.lora is not None:  # its blocks are named under the adapter's content digest
            seq.lora_key = self.lora.get(params.lora).digest
        if isinstance(prompt, MultimodalPrompt):
            seq.images = RequestImages.from_prompt(prompt)
        seq.thinking = ThinkingBudget.for_request(params, ids, self.tokenizer)
        if params.structured is not None:
            try:  # reasoning-aware: a thinking section the prompt leaves open stays unconstrained
                markers = thinking_markers(params, self.tokenizer, self.model_config.vocab_size)
            except ValueError:
                markers = None
            seq.structured = self.grammars.new_state(params.structured, stop_ids, ids, markers)
        if params.needs_processors:
            bad = bad_word_token_ids(self.tokenizer, params.bad_words) if params.bad_words else []
            seq.processors = LogitProcessors(params, stop_ids, bad, self.model.device)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (None if unknown/finished). For
        ``n > 1`` every sample still going is stopped and this is the first of their outputs
        (``abort_samples`` returns them all)."""
        outputs = self.abort_samples(request_id)
        return outputs[0] if outputs else None

    def abort_sample(self, request_id: str, index: int) -> RequestOutput | None:
        """Stop one sample of a request with ``n > 1`` (its reply is complete; the others go on); its
        final output has finish_reason 'abort'. None when that sample is unknown or finished."""
        seqs = self.samples.get(request_id)
        seq = next((s for s in seqs or () if s.index == index), None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        seq.abort()
        out = seq.make_output()
        self._finish(seq)  # the request finishes with its last sample
        return out

    def abort_samples(self, request_id: str) -> list[RequestOutput]:
        """``abort_request``, returning the final output of every sample it stopped, in index order
        (empty if the request is unknown or finished)."""
        self.requests.pop(request_id, None)
        seqs = self.samples.pop(request_id, None)
        if seqs is None:
            return []
        outputs = []
        for seq in seqs:
            self.scheduler.remove(seq)
            seq.abort()
            outputs.append(seq.make_output())
        self.requests_aborted += 1
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + self.scheduler.num_parked

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample. Returns an output for every request that produced a
        token this step (finished ones included). With a disk tier, the blocks the step named are then
        queued for writing."""
        outputs = self._step()
        if self.disk is not None:
            self.runner.save_to_disk(self.cache.take_disk_writes())
        return outputs

    def _step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            # evictions decided while scheduling still move to the host tier; state copies still run (every rank)
            if batch.swap_out or batch.swap_in or batch.disk_in or batch.state_copies:
                self.runner.execute(batch)
            if self.scheduler.has_work():
                raise RuntimeError("the scheduler could not schedule any work although requests are pending "
                                   f"({len(self.scheduler.waiting)} waiting, {len(self.scheduler.running)} running, "
                                   f"{self.cache.num_free_blocks} free blocks)")
            return []
        self.num_steps += 1
        if self.vision is not None:  # features for the image positions this step computes
            work = [(seq.images, seq.num_computed_tokens, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)
                    if seq.images is not None]
            if work:
                self.vision.provide(work)
        to_sample, logits = self.runner.execute(batch)
        for entry, (offset, lps, ranks, top_v, top_i) in self.runner.prompt_logprobs.items():
            seq = batch.seqs[entry]  # its rows predict prompt tokens num_computed_tokens + offset + 1 ...
            first = seq.num_computed_tokens + offset + 1
            seq.prompt_logprobs.add(first, seq.token_ids[first:first + len(lps)], lps, ranks, top_v, top_i)
        drafts = batch.draft_tokens
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq not in drafts:  # a verifying sequence's computed count depends on what it accepts
                seq.num_computed_tokens += n
                self.cache.cache_full_blocks(seq)
                if seq.images is not None:
                    seq.images.release(seq.num_computed_tokens)
        outputs: list[RequestOutput] = []
        finished: list[Sequence] = []
        if any(seq.params.max_tokens == 0 for seq in to_sample):  # prompt only: finished, nothing sampled
            to_sample, logits = self._finish_prompt_only(to_sample, logits, drafts, finished, outputs)
        if not to_sample:
            if isinstance(self.proposer, MTPProposer):  # prompt chunks only: the MTP layer catches up over them
                self.proposer.observe(batch.seqs, self.runner)
            for seq in finished:
                self.scheduler.remove(seq)
                self._finish(seq)
            return outputs
        results = self.sampler.verify(logits, to_sample, [drafts.get(seq, ()) for seq in to_sample])
        for seq, result in zip(to_sample, results):
            kept = 0
            for token, lp in zip(result.tokens, result.logprobs):
                seq.append_token(token, self.max_model_len, lp)
                kept += 1
                if seq.finish_reason is not None:  # a stop inside an accepted run drops the rest
                    break
            self.generation_tokens_total += kept
            draft = drafts.get(seq)
            if draft is not None:
                # its last token and the accepted drafts now have correct latents; the rejected drafts'
                # slots lie past num_computed_tokens: never registered, overwritten by later steps
                start = seq.num_computed_tokens
                seq.num_computed_tokens = min(start + 1 + result.num_accepted, seq.num_tokens)
                self.cache.cache_full_blocks(seq)
                rows = batch.spec_state_rows.get(seq)
                if rows is not None:
                    self._settle_state(seq, start, rows)
                self.spec_draft_tokens += len(draft)
                self.spec_accepted_tokens += min(result.num_accepted, kept)
                self.spec_verifications += 1
            if seq.finish_reason is not None:
                finished.append(seq)
            outputs.append(seq.make_output())
        if isinstance(self.proposer, MTPProposer):  # the MTP layer over what this step computed (finished
            self.proposer.observe(batch.seqs, self.runner)  # sequences too: their blocks stay cached), then drafts
        for seq in finished:
            self.scheduler.remove(seq)
            self._finish(seq)
        return outputs

    @staticmethod
    def _finish_prompt_only(to_sample: list[Sequence], logits: torch.Tensor, drafts: dict,
                            finished: list[Sequence], outputs: list[RequestOutput]):
        """Finish the ``max_tokens=0`` sequences among ``to_sample`` (their prompt is computed; they end
        with 'length' and no token); returns the other sequences and their logits rows."""
        keep_seqs, keep_rows, row = [], [], 0
        for seq in to_sample:
            count = 1 + len(drafts.get(seq, ()))
            if seq.params.max_tokens == 0:
                seq.finish_reason = "length"
                seq.text.finish()
                finished.append(seq)
                outputs.append(seq.make_output())
            else:
                keep_seqs.append(seq)
                keep_rows.extend(range(row, row + count))
            row += count
        if not keep_seqs:
            return [], None
        return keep_seqs, logits[torch.tensor(keep_rows, device=logits.device)]

    def _finish(self, seq: Sequence) -> None:
        """A finished sample leaves its request; the request is finished with its last sample."""
        seqs = self.samples.get(seq.request_id)
        if seqs is None or seq not in seqs:
            return
        seqs.remove(seq)
        if not seqs:
            del self.samples[seq.request_id]
            self.requests.pop(seq.request_id, None)
            self.requests_finished += 1

    def _settle_state(self, seq: Sequence, start: int, rows: list[int]) -> None:
        """A hybrid model's sequence after verifying drafts from position ``start``: its slot holds the
        state after all of them, snapshot row ``rows[j]`` the state after its known token and j drafts.
        Queue for the next step (before anything reads the states) the copy of the right one back into
        the slot, after a snapshot of the last block boundary the accepted drafts crossed (the
        sequence's latest output snapshot, which a conversation's next turn resumes from)."""
        num_slots = self.config.max_num_seqs
        copies = self.scheduler.pending_state_copies
        after = seq.num_computed_tokens - start  # tokens of the span whose state is right
        point = (start + after) // self.config.block_size * self.config.block_size
        if self.cache.snapshots is not None and point - start >= 2:  # offset 1 was the plan's (scheduler)
            reserved = self.cache._reserve(seq, point, output=point > seq.num_prompt_tokens)
            if reserved is not None:
                offset = point - start
                src = seq.state_slot if offset == len(rows) + 1 else num_slots + rows[offset - 1]
                copies.append((src, num_slots + reserved[1]))
                seq.snapshot_pending = seq.output_snapshot = reserved[0]
                self.cache.cache_full_blocks(seq)  # names it: the copy runs before any step could load it
        if after <= len(rows) and seq.finish_reason is None:
            copies.append((num_slots + rows[after - 1], seq.state_slot))

    # ---- metrics --------------------------------------------------------------------------------
    def _draft_stats(self) -> dict:
        proposer = self.proposer
        if not isinstance(proposer, (DraftModelProposer, MTPProposer)):
            return {}
        stats = {"draft_forwards": proposer.steps, "draft_catch_up_tokens": proposer.catch_up_tokens}
        if isinstance(proposer, DraftModelProposer):
            stats["draft_reused_tokens"] = proposer.reused_tokens
        return stats

    def stats(self) -> dict:
        """Counters and gauges (see docs/serving-engine.md for each key)."""
        c = self.cache.counters
        snaps = self.cache.snapshots
        vision = self.vision
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + self.scheduler.num_parked,
            "blocks_total": self.cache.num_blocks,
            "blocks_free": self.cache.num_free_blocks,
            "block_size": self.config.block_size,
            "cache_usage": self.cache.usage,
            "kv_cache_dtype": str(self.pool.dtype).removeprefix("torch."),  # the pool's storage (kv_cache_dtype)
            "kv_cache_bytes": self.pool.nbytes,  # the pool's bytes, FP8 scales included
            "prefix_cache_queries": c.prefix_cache_queries,
            "prefix_cache_hits": c.prefix_cache_hits,
            "state_snapshots": len(snaps) if snaps is not None else 0,
            "state_snapshots_saved": snaps.num_saved if snaps is not None else 0,
            "state_snapshots_restored": snaps.num_restored if snaps is not None else 0,
            "state_snapshots_branch": snaps.num_branch_saved if snaps is not None else 0,
            "prompt_tokens_total": self.scheduler.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "preemptions": self.scheduler.num_preemptions,
            "priority_preemptions": self.scheduler.priority_preemptions,
            "requests_finished": self.requests_finished,
            "requests_aborted": self.requests_aborted,
            "steps": self.num_steps,
            "max_model_len": self.max_model_len,
            "spec_draft_tokens": self.spec_draft_tokens,
            "spec_accepted_tokens": self.spec_accepted_tokens,
            "spec_verifications": self.spec_verifications,
            **self._draft_stats(),
            "images_encoded": vision.images_encoded if vision else 0,
            "image_encoder_calls": vision.vision_forwards if vision else 0,
            "image_cache_hits": vision.cache_hits if vision else 0,
            "images_skipped": vision.images_skipped if vision else 0,
            "image_cache_bytes": vision.cache.num_bytes if vision else 0,
            **self._host_stats(),
            **self._disk_stats(),
            **self._lora_stats(),
        }

    def _lora_stats(self) -> dict:
        """Multi-LoRA counters (0 when off) and ``lora_requests``: {adapter: requests added under it}."""
        lora = self.lora
        if lora is None:
            return {"lora_adapters": 0, "lora_resident": 0, "lora_loads": 0, "lora_evictions": 0, "lora_requests": {}}
        return {**lora.stats(), "lora_requests": {n: a.requests for n, a in lora.adapters.items()}}

    def _host_stats(self) -> dict:
        """The host cache tier's counters (all 0 when it is off)."""
        c, host, per_block = self.cache.counters, self.cache.host, self.config.host_block_bytes
        return {
            "host_cache_blocks_total": host.capacity if host is not None else 0,
            "host_cache_blocks_used": len(host) if host is not None else 0,
            "host_cache_hits": c.host_cache_hits,
            "host_cache_blocks_swapped_in": c.host_blocks_swapped_in,
            "host_cache_blocks_swapped_out": c.host_blocks_swapped_out,
            "host_cache_bytes_swapped_in": c.host_blocks_swapped_in * per_block,
            "host_cache_bytes_swapped_out": c.host_blocks_swapped_out * per_block,
        }

    def _disk_stats(self) -> dict:
        """The disk cache tier's counters (all 0 when it is off)."""
        c, disk = self.cache.counters, self.disk
        d = disk.counters if disk is not None else None
        return {
            "disk_cache_bytes_total": disk.capacity if disk is not None else 0,
            "disk_cache_bytes_used": disk.bytes_used if disk is not None else 0,
            "disk_cache_blocks_used": len(disk) if disk is not None else 0,
            "disk_cache_hits": c.disk_cache_hits,
            "disk_cache_blocks_read": d.blocks_read if d is not None else 0,
            "disk_cache_bytes_read": d.bytes_read if d is not None else 0,
            "disk_cache_blocks_written": d.blocks_written if d is not None else 0,
            "disk_cache_bytes_written": d.bytes_written if d is not None else 0,
            "disk_cache_writes_dropped": d.writes_dropped if d is not None else 0,
            "disk_cache_write_errors": d.write_errors if d is not None else 0,
            "disk_cache_blocks_evicted": d.blocks_evicted if d is not None else 0,
            "disk_cache_corrupt": d.corrupt if d is not None else 0,
        }
