"""ModelConfig: the K2 / DeepSeek-V3 / DeepSeek-V2 / Kimi Linear family config, read from and written to
HF config.json.

Field names are the checkpoint's own (``kv_lora_rank``, ``n_routed_experts`` ...) so a reader can hold
the code against any config.json. Unknown keys are kept in ``extra`` and written back unchanged.
Kimi Linear (``model_type: kimi_linear``) spells some MoE keys differently (``num_experts``,
``num_experts_per_token`` ...): they are read into the same fields and written back in its spelling.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "kimi_k25", "deepseek_v3", "deepseek_v2", "kimi_linear")

# Kimi Linear's config.json key -> the ModelConfig field it sets.
KIMI_LINEAR_KEYS = {
    "num_experts": "n_routed_experts",
    "num_experts_per_token": "num_experts_per_tok",
    "num_shared_experts": "n_shared_experts",
    "moe_router_activation_func": "scoring_func",
    "moe_renormalize": "norm_topk_prob",
    "num_expert_group": "n_group",
}
LINEAR_ATTN_KEYS = ("full_attn_layers", "kda_layers", "num_heads", "head_dim", "short_conv_kernel_size")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.827
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    topk_method: str = "noaux_tc"  # noaux_tc | greedy | group_limited_greedy
    scoring_func: str = "sigmoid"  # sigmoid | softmax
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    max_position_embeddings: int = 131072
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0
    torch_dtype: str | None = "bfloat16"
    quantization_config: dict | None = None
    # MoBA block-sparse attention (moonlet's own key; see moonlet/model/sparse.py):
    # {"block_size": B, "top_k": k, "full_attention_layers": [0-based layer ids that stay dense]}.
    moba_config: dict | None = None
    # MLA without positional encoding (Kimi Linear's full-attention layers): k_pe/q_pe are not rotated.
    mla_use_nope: bool = False
    # Kimi Linear's hybrid layout, as its config.json spells it: {"kda_layers": [...], "full_attn_layers":
    # [...]} (1-based layer numbers!), "num_heads", "head_dim", "short_conv_kernel_size". See is_kda_layer.
    linear_attn_config: dict | None = None
    # Keys of config.json this class does not model, written back unchanged.
    extra: dict = field(default_factory=dict, repr=False)
    # For kimi_k25: the outer (multimodal) config, with our fields living under text_config.
    outer: dict | None = field(default=None, repr=False)
    # Fields the source config.json did not hold and from_dict filled in (kimi_linear only), with the
    # value it used: to_dict leaves them out again while they keep that value, so the file round-trips.
    implied: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; moonlet reads {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind in (None, "default"):
                self.rope_scaling = None
            elif kind != "yarn":
                raise ValueError(f"unsupported rope_scaling type {kind!r}; moonlet implements 'yarn' (or none)")
        if self.moba_config is not None:
            self.moba_config = _check_moba_config(self.moba_config, self.num_hidden_layers)
        if self.linear_attn_config is not None:
            self.linear_attn_config = _check_linear_attn_config(self.linear_attn_config, self.num_hidden_layers)
        if self.n_routed_experts % max(self.n_group, 1):
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}"
            )
        if self.n_routed_experts and self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}"
            )

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by the absorbed path: latent + rotated k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def vision_config(self) -> "VisionConfig | None":
        """The parsed, validated ``vision_config`` of a kimi_k25 config (None for text-only configs).

        Parsed on each access from the outer config, which stays the source of truth for round trips;
        raises ValueError naming the bad key when the vision_config is not one moonlet implements."""
        if self.outer is None or not self.outer.get("vision_config"):
            return None
        vision = VisionConfig.from_dict(self.outer["vision_config"])
        if vision.text_hidden_size != self.hidden_size:
            raise ValueError(f"vision_config.text_hidden_size={vision.text_hidden_size} does not match the text "
                             f"model's hidden_size={self.hidden_size}: the projector feeds the text model")
        return vision

    @property
    def media_placeholder_token_id(self) -> int | None:
        """The token id image placeholders carry in the prompt (kimi_k25: ``<|media_pad|>``, 163605)."""
        if self.outer is None:
            return None
        return self.outer.get("media_placeholder_token_id", 163605 if self.outer.get("vision_config") else None)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % max(self.moe_layer_freq, 1) == 0
        )

    def is_kda_layer(self, layer: int) -> bool:
        """Whether ``layer`` (0-based) is a Kimi Delta Attention layer rather than MLA.

        ``linear_attn_config.kda_layers`` holds 1-based layer numbers, as the published config does."""
        return self.linear_attn_config is not None and (layer + 1) in self.linear_attn_config["kda_layers"]

    @property
    def kda_layer_ids(self) -> list[int]:
        """0-based ids of the KDA layers (empty without linear_attn_config)."""
        return [i for i in range(self.num_hidden_layers) if self.is_kda_layer(i)]

    def is_moba_layer(self, layer: int) -> bool:
        """Whether ``layer``'s attention is MoBA block-sparse (``moba_config``) rather than dense."""
        return self.moba_config is not None and layer not in self.moba_config["full_attention_layers"]

    @property
    def yarn_factor(self) -> float:
        return float(self.rope_scaling.get("factor") or 1.0) if self.rope_scaling else 1.0

    @property
    def softmax_scale(self) -> float:
        """(nope+rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(self.yarn_factor, mscale_all_dim)
                scale = scale * m * m
        return scale

    # ---- HF config.json -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = copy.deepcopy(data)
        outer = None
        if data.get("model_type") == "kimi_k25" or (
            "text_config" in data and data.get("model_type") not in ("kimi_k2", "deepseek_v3", "deepseek_v2")
        ):
            if "text_config" not in data:
                raise ValueError("model_type kimi_k25 needs a 'text_config' holding the text model's config")
            outer = {k: v for k, v in data.items() if k != "text_config"}
            text = dict(data["text_config"])
            text.setdefault("model_type", "kimi_k2")
            if text["model_type"] not in SUPPORTED_MODEL_TYPES:
                text["model_type"] = "kimi_k2"
            data = text
        # transformers 5 spells rope settings as rope_parameters {rope_type, rope_theta, ...}.
        rope_params = data.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params:
                data.setdefault("rope_theta", rope_params.pop("rope_theta"))
            kind = rope_params.pop("rope_type", rope_params.pop("type", "default"))
            if kind != "default" and "rope_scaling" not in data:
                data["rope_scaling"] = {"type": kind, **rope_params}
        if data.get("model_type") == "deepseek_v2":
            data.setdefault("topk_method", "greedy")
            data.setdefault("scoring_func", "softmax")
            data.setdefault("norm_topk_prob", False)
        implied: dict[str, Any] = {}
        if data.get("model_type") == "kimi_linear":
            implied = _read_kimi_linear_keys(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "outer", "implied"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if "num_experts" in extra and "n_routed_experts" not in known:
            known["n_routed_experts"] = extra.pop("num_experts")
        for key in ("n_group", "topk_group"):
            if known.get(key) is None:
                known.pop(key, None)
        if known.get("n_routed_experts") is None:
            known["n_routed_experts"] = 0
        cfg = cls(**known, extra=extra, outer=outer, implied=implied)
        return cfg

    def to_dict(self, spelling: str = "hub") -> dict:
        """The config as config.json would hold it.

        spelling="hub" writes ``rope_scaling`` (what the published checkpoints use); "transformers5"
        writes ``rope_parameters`` instead.
        """
        out: dict[str, Any] = {}
        kimi_linear = self.model_type == "kimi_linear"
        kimi_name = {name: key for key, name in KIMI_LINEAR_KEYS.items()}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "outer", "implied"):
                continue
            value = getattr(self, f.name)
            if kimi_linear:
                if f.name in self.implied and value == self.implied[f.name]:
                    continue  # the source config did not hold it
                out[kimi_name.get(f.name, f.name)] = copy.deepcopy(value)
            else:
                out[f.name] = copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        for key, default in (("quantization_config", None), ("moba_config", None), ("mla_use_nope", False),
                             ("linear_attn_config", None)):
            if key in out and out[key] == default:  # absent from the published configs: keep their keys as they are
                out.pop(key)
        if spelling == "transformers5":
            rope = {"rope_type": "default", "rope_theta": out.pop("rope_theta")}
            scaling = out.pop("rope_scaling")
            if scaling:
                scaling = dict(scaling)
                scaling.pop("type", None)
                rope.update(scaling, rope_type="yarn")
            out["rope_parameters"] = rope
        elif spelling != "hub":
            raise ValueError(f"unknown spelling {spelling!r}; use 'hub' or 'transformers5'")
        if kimi_linear:
            out = dict(sorted(out.items()))  # as transformers writes it
        if self.outer is not None:
            outer = copy.deepcopy(self.outer)
            outer["text_config"] = out
            return outer
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> "ModelConfig":
        """A preset name (see ``PRESETS``), a checkpoint directory or a config.json path."""
        key = str(name_or_path)
        if key in PRESETS:
            return preset(key)
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no config at {path}: give a checkpoint directory holding config.json, a config.json path, "
                f"or a preset name ({', '.join(PRESETS)})"
            )
        return cls.from_json_file(path)

    def save_pretrained(self, directory: str | os.PathLike, spelling: str = "hub") -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        path.write_text(json.dumps(self.to_dict(spelling), indent=2) + "\n", encoding="utf-8")
        return path

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- parameter counting ---------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameters, embedding and lm_head included; MTP layers excluded."""
        H, nh = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            attn = H * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
        else:
            attn = H * nh * self.qk_head_dim
        attn += H * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim) + nh * self.v_head_dim * H
        norms = 2 * H
        expert = 3 * H * self.moe_intermediate_size
        dense = 3 * H * self.intermediate_size
        kda = self.kda_layer_params()
        total = active = 0
        for layer in range(self.num_hidden_layers):
            mixer = kda if self.is_kda_layer(layer) else attn
            total += mixer + norms
            active += mixer + norms
            if self.is_moe_layer(layer):
                E, S, k = self.n_routed_experts, self.n_shared_experts, self.num_experts_per_tok
                router = E * H + (E if self.topk_method == "noaux_tc" else 0)
                total += E * expert + S * expert + router
                active += k * expert + S * expert + router
            else:
                total += dense
                active += dense
        embed = self.vocab_size * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        total += embed + head + H
        active += embed + head + H
        return {"total": total, "active": active}

    def kda_layer_params(self) -> int:
        """Parameters of one KDA layer (0 without linear_attn_config): q/k/v projections and their short
        convolutions, A_log, the low-rank decay (f_a, f_b) and dt_bias, b_proj, the low-rank output
        gate (g_a, g_b), o_norm and o_proj."""
        if self.linear_attn_config is None:
            return 0
        lin = self.linear_attn_config
        H, nh, d, W = self.hidden_size, lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
        P = nh * d
        return (3 * H * P + 3 * P * W + nh + (H * d + d * P + P) + H * nh + (H * d + d * P) + d + P * H)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> dict[str, int]:
        """Cache bytes per token over the attention (MLA) layers: MLA's latent cache vs an expanded
        per-head K/V cache. KDA layers keep a fixed-size state instead (``kda_state_bytes``)."""
        layers = self.num_hidden_layers - len(self.kda_layer_ids)
        latent = self.latent_dim * layers * bytes_per_value
        per_head = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        expanded = per_head * layers * bytes_per_value
        return {"latent": latent, "expanded": expanded}

    def kda_state_bytes(self, conv_bytes_per_value: int = 2) -> int:
        """Bytes one sequence's KDA state takes over all KDA layers, whatever its length: the float32
        delta-rule state (heads × d × d) and the short convolutions' last kernel−1 inputs."""
        if self.linear_attn_config is None:
            return 0
        lin = self.linear_attn_config
        nh, d, W = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
        per_layer = nh * d * d * 4 + 3 * (W - 1) * nh * d * conv_bytes_per_value
        return per_layer * len(self.kda_layer_ids)


# ---- the K2.5 / K2.6 vision encoder (MoonViT) and projector ----------------------------------------

# vLLM's KimiK25VisionConfig spells the tower's sizes without the ``vt_`` prefix the published
# config.json uses; either spelling is read, and written back as it was read.
VISION_KEY_ALIASES = {
    "vt_hidden_size": "hidden_size",
    "vt_intermediate_size": "intermediate_size",
    "vt_num_attention_heads": "num_attention_heads",
    "vt_num_hidden_layers": "num_hidden_layers",
}
# The only variants moonlet implements (the published K2.5 values): anything else changes the math.
_VISION_FIXED = {
    "pos_emb_type": "divided_fixed",
    "merge_type": "sd2_tpool",
    "video_attn_type": "spatial_temporal",
    "mm_projector_type": "patchmerger",
    "projector_hidden_act": "gelu",
}


@dataclass
class VisionConfig:
    """``vision_config`` of a kimi_k25 (K2.5 / K2.6) config.json: the MoonViT tower and the patch-merger
    projector into the text model.

    Field names are the published config's. Defaults are the published K2.5 values (27 blocks of width
    1152, 16 heads, 14-pixel patches, a 64x64 learned position table, 2x2 patch merging, a projector
    into hidden size 7168). Unknown keys are kept in ``extra`` and written back; keys the source did not
    hold are recorded in ``implied`` and left out again by ``to_dict``.
    """

    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    init_pos_emb_time: int = 4
    pos_emb_type: str = "divided_fixed"
    vt_hidden_size: int = 1152
    vt_intermediate_size: int = 4304
    vt_num_attention_heads: int = 16
    vt_num_hidden_layers: int = 27
    merge_kernel_size: tuple[int, int] = (2, 2)
    merge_type: str = "sd2_tpool"
    video_attn_type: str = "spatial_temporal"
    mm_projector_type: str = "patchmerger"
    mm_hidden_size: int | None = None  # the projector's input width per patch: the tower's width
    projector_hidden_act: str = "gelu"
    projector_ln_eps: float = 1e-5
    text_hidden_size: int = 7168
    extra: dict = field(default_factory=dict, repr=False)
    implied: dict = field(default_factory=dict, repr=False, compare=False)
    aliases: dict = field(default_factory=dict, repr=False, compare=False)  # field -> key it was read from

    def __post_init__(self) -> None:
        if self.mm_hidden_size is None:
            self.mm_hidden_size = self.vt_hidden_size
        for name in ("patch_size", "init_pos_emb_height", "init_pos_emb_width", "init_pos_emb_time",
                     "vt_hidden_size", "vt_intermediate_size", "vt_num_attention_heads", "vt_num_hidden_layers",
                     "mm_hidden_size", "text_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"vision_config.{name} must be a positive integer; got {value!r}")
        merge = self.merge_kernel_size
        if isinstance(merge, int) and not isinstance(merge, bool):
            merge = (merge, merge)
        if (not isinstance(merge, (list, tuple)) or len(merge) != 2
                or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in merge)):
            raise ValueError(f"vision_config.merge_kernel_size must be two positive integers [kh, kw]; got {merge!r}")
        self.merge_kernel_size = (int(merge[0]), int(merge[1]))
        for name, want in _VISION_FIXED.items():
            if getattr(self, name) != want:
                raise ValueError(f"vision_config.{name}={getattr(self, name)!r} is not implemented; moonlet "
                                 f"implements K2.5's {want!r}")
        if self.vt_hidden_size % self.vt_num_attention_heads:
            raise ValueError(f"vision_config.vt_hidden_size={self.vt_hidden_size} is not divisible by "
                             f"vt_num_attention_heads={self.vt_num_attention_heads}")
        if self.head_dim % 4:
            raise ValueError(f"the vision head size {self.head_dim} (vt_hidden_size / vt_num_attention_heads) must "
                             "be divisible by 4: the 2D rotary embedding splits it into x and y frequency pairs")
        if self.mm_hidden_size != self.vt_hidden_size:
            raise ValueError(f"vision_config.mm_hidden_size={self.mm_hidden_size} must equal vt_hidden_size="
                             f"{self.vt_hidden_size}: the projector normalizes the tower's outputs")
        if not isinstance(self.projector_ln_eps, (int, float)) or self.projector_ln_eps <= 0:
            raise ValueError(f"vision_config.projector_ln_eps must be a positive number; got {self.projector_ln_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.vt_hidden_size // self.vt_num_attention_heads

    @property
    def merged_dim(self) -> int:
        """Width of one merged token before the projector: kh * kw patches of vt_hidden_size."""
        kh, kw = self.merge_kernel_size
        return self.vt_hidden_size * kh * kw

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        if not isinstance(data, dict):
            raise ValueError(f"vision_config must be a JSON object; got {type(data).__name__}")
        data = copy.deepcopy(data)
        aliases = {}
        for name, alias in VISION_KEY_ALIASES.items():
            if name not in data and alias in data:
                data[name] = data.pop(alias)
                aliases[name] = alias
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "implied", "aliases"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in names}
        implied = {k: v for k, v in defaults.items() if k not in known}
        return cls(**known, extra=extra, implied=implied, aliases=aliases)

    def to_dict(self) -> dict:
        """The vision_config as config.json holds it (keys the source left out stay out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "implied", "aliases"):
                continue
            value = getattr(self, f.name)
            if f.name == "merge_kernel_size":
                value = list(value)
            if f.name in self.implied:
                default = self.vt_hidden_size if f.name == "mm_hidden_size" else self.implied[f.name]
                if value == (list(default) if isinstance(default, tuple) else default):
                    continue  # the source config did not hold it
            out[self.aliases.get(f.name, f.name)] = copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return out

    def param_counts(self) -> dict[str, int]:
        """Parameters of the tower (patch embedding, position table, blocks, final norm) and of the
        projector (pre-norm and two linear layers), as the checkpoint stores them."""
        D, F, P = self.vt_hidden_size, self.vt_intermediate_size, self.patch_size
        patch = 3 * P * P * D + D
        pos = self.init_pos_emb_height * self.init_pos_emb_width * D
        block = (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D) + 4 * D
        tower = patch + pos + self.vt_num_hidden_layers * block + 2 * D
        M = self.merged_dim
        projector = 2 * D + (M * M + M) + (M * self.text_hidden_size + self.text_hidden_size)
        return {"vision_tower": tower, "mm_projector": projector, "total": tower + projector}


def _check_moba_config(moba: dict, num_layers: int) -> dict:
    """Validate ``moba_config`` and fill its defaults; errors name the bad value and the fix."""
    if not isinstance(moba, dict):
        raise ValueError(f"moba_config must be a dict {{block_size, top_k, full_attention_layers}}; got {moba!r}")
    unknown = set(moba) - {"block_size", "top_k", "full_attention_layers"}
    if unknown:
        raise ValueError(f"moba_config has unknown keys {sorted(unknown)}; "
                         "known: block_size, top_k, full_attention_layers")
    out = dict(moba)
    for key in ("block_size", "top_k"):
        value = out.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"moba_config.{key} must be a positive integer; got {value!r}")
    layers = out.get("full_attention_layers", [])
    if not isinstance(layers, (list, tuple)) or any(
            not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers for i in layers):
        raise ValueError(f"moba_config.full_attention_layers must list 0-based layer ids below "
                         f"num_hidden_layers={num_layers}; got {layers!r}")
    out["full_attention_layers"] = sorted(set(layers))
    return out


# What transformers' KimiLinearConfig assumes for keys a kimi_linear config.json leaves out, where that
# differs from this class's defaults (which are K2's).
_KIMI_LINEAR_DEFAULTS = dict(
    n_routed_experts=0, n_shared_experts=0, routed_scaling_factor=1.0, first_k_dense_replace=0, n_group=1,
    topk_group=1, q_lora_rank=None, rope_theta=10000.0, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, scoring_func="sigmoid", norm_topk_prob=True,
    # moonlet-only fields: Kimi Linear's router always has the correction bias (noaux_tc); its
    # context length is model_max_length; its dtype may be spelled "dtype" (kept in extra).
    topk_method="noaux_tc", torch_dtype=None,
)


def _read_kimi_linear_keys(data: dict) -> dict:
    """Rename a kimi_linear config's keys to ModelConfig fields in place and fill the fields it leaves out
    with Kimi Linear's defaults. Returns {field: value} of what was filled in."""
    for key, name in KIMI_LINEAR_KEYS.items():
        if key in data and name not in data:
            data[name] = data.pop(key)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING}
    defaults.update(_KIMI_LINEAR_DEFAULTS)
    defaults["max_position_embeddings"] = data.get("model_max_length", defaults["max_position_embeddings"])
    defaults["num_key_value_heads"] = data.get("num_attention_heads", defaults["num_attention_heads"])
    implied = {}
    for name, value in defaults.items():
        if name not in data and name not in ("model_type", "outer"):
            data[name] = implied[name] = copy.deepcopy(value)
    if data.get("n_routed_experts") is None:
        data["n_routed_experts"] = 0  # "num_experts": null is a dense model
    return implied


def _check_linear_attn_config(lin: dict, num_layers: int) -> dict:
    """Validate Kimi Linear's ``linear_attn_config``; errors name the bad value and the fix."""
    if not isinstance(lin, dict):
        raise ValueError(f"linear_attn_config must be a dict {{{', '.join(LINEAR_ATTN_KEYS)}}}; got {lin!r}")
    unknown = set(lin) - set(LINEAR_ATTN_KEYS)
    if unknown:
        # e.g. a gate lower bound or a full-rank gate would change the layer's math: refuse, don't ignore
        raise ValueError(f"linear_attn_config has keys moonlet does not implement: {sorted(unknown)}; "
                         f"known: {', '.join(LINEAR_ATTN_KEYS)}")
    missing = [k for k in LINEAR_ATTN_KEYS if k not in lin]
    if missing:
        raise ValueError(f"linear_attn_config lacks {missing}; it needs {', '.join(LINEAR_ATTN_KEYS)}")
    for key in ("num_heads", "head_dim", "short_conv_kernel_size"):
        value = lin[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"linear_attn_config.{key} must be a positive integer; got {value!r}")
    for key in ("kda_layers", "full_attn_layers"):
        layers = lin[key]
        if not isinstance(layers, (list, tuple)) or any(
                not isinstance(i, int) or isinstance(i, bool) or not 1 <= i <= num_layers for i in layers):
            raise ValueError(f"linear_attn_config.{key} must list 1-based layer numbers from 1 to "
                             f"num_hidden_layers={num_layers} (the published config counts from 1); got {layers!r}")
    both = sorted(set(lin["kda_layers"]) & set(lin["full_attn_layers"]))
    if both:
        raise ValueError(f"linear_attn_config lists layers {both} both as kda_layers and as full_attn_layers")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in lin.items()}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


# ---- presets --------------------------------------------------------------------------------------

_K2 = dict(
    model_type="kimi_k2", vocab_size=163840, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=64, n_shared_experts=1,
    n_routed_experts=384, num_experts_per_tok=8, routed_scaling_factor=2.827, kv_lora_rank=512,
    q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="noaux_tc",
    scoring_func="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True, first_k_dense_replace=1,
    max_position_embeddings=131072, rope_theta=50000.0, rms_norm_eps=1e-6,
    rope_scaling=dict(type="yarn", factor=32.0, beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                      original_max_position_embeddings=4096),
    bos_token_id=163584, eos_token_id=163585,
    quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", weight_block_size=[128, 128]),
)
_YARN64 = dict(type="yarn", factor=64.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
               original_max_position_embeddings=4096)
_INT4_EXPERTS = dict(
    quant_method="compressed-tensors", format="pack-quantized",
    config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}}},
    ignore=["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
)

# Kimi-Linear-48B-A3B (moonshotai/Kimi-Linear-48B-A3B-Instruct), in its config.json's own keys: 27 layers,
# KDA everywhere but the 1-based layers 4, 8, ..., 24, 27, which are NoPE MLA.
_KIMI_LINEAR_48B = dict(
    architectures=["KimiLinearForCausalLM"], model_type="kimi_linear", vocab_size=163840, hidden_size=2304,
    head_dim=72, intermediate_size=9216, moe_intermediate_size=1024, num_hidden_layers=27, num_attention_heads=32,
    num_key_value_heads=32, num_experts=256, num_experts_per_token=8, num_shared_experts=1, moe_layer_freq=1,
    first_k_dense_replace=1, moe_renormalize=True, moe_router_activation_func="sigmoid", routed_scaling_factor=2.446,
    use_grouped_topk=True, num_expert_group=1, topk_group=1, kv_lora_rank=512, q_lora_rank=None,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mla_use_nope=True,
    linear_attn_config=dict(
        full_attn_layers=[4, 8, 12, 16, 20, 24, 27],
        kda_layers=[i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)],
        num_heads=32, head_dim=128, short_conv_kernel_size=4,
    ),
    model_max_length=1048576, rope_scaling=None, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu",
    initializer_range=0.02, tie_word_embeddings=False, num_nextn_predict_layers=0, use_cache=True,
    bos_token_id=163584, eos_token_id=163586, pad_token_id=163839, torch_dtype="bfloat16",
)

PRESET_NOTES: dict[str, str] = {
    "kimi-k3-forecast": (
        "FORECAST, not a released model: a K2-architecture extrapolation to >=2.5T total parameters and a "
        "1M-token context, as public reports anticipate. Shapes are moonlet's guess."
    ),
}

# Kimi K2.5's published config.json (moonshotai/Kimi-K2.5): the K2 text model (as the kimi-k2.6 preset)
# under text_config, the MoonViT tower and patch-merger projector under vision_config.
_K25_VISION = dict(
    init_pos_emb_height=64, init_pos_emb_time=4, init_pos_emb_width=64, merge_kernel_size=[2, 2],
    merge_type="sd2_tpool", mm_hidden_size=1152, mm_projector_type="patchmerger", model_type="", patch_size=14,
    pos_emb_type="divided_fixed", projector_hidden_act="gelu", projector_ln_eps=1e-05, text_hidden_size=7168,
    video_attn_type="spatial_temporal", vt_hidden_size=1152, vt_intermediate_size=4304, vt_num_attention_heads=16,
    vt_num_hidden_layers=27,
)

PRESETS: dict[str, dict] = {
    "kimi-k2": _K2,
    "kimi-k2-0905": {**_K2, "rope_scaling": _YARN64, "max_position_embeddings": 262144},
    "kimi-k2.6": {**_K2, "rope_scaling": _YARN64, "max_position_embeddings": 262144, "rms_norm_eps": 1e-5,
                  "quantization_config": _INT4_EXPERTS},
    "kimi-k2.5": dict(
        architectures=["KimiK25ForConditionalGeneration"], model_type="kimi_k25", media_placeholder_token_id=163605,
        bos_token_id=163584, eos_token_id=163585, pad_token_id=163839, ignore_index=-100,
        use_unified_vision_chunk=True, video_placeholder="<|kimi_k25_video_placeholder|>",
        text_config={**_K2, "model_type": "deepseek_v3", "rope_scaling": _YARN64, "max_position_embeddings": 262144,
                     "rms_norm_eps": 1e-5, "pad_token_id": 163839, "quantization_config": _INT4_EXPERTS},
        vision_config=_K25_VISION,
    ),
    "moonlight-16b-a3b": dict(
        model_type="deepseek_v3", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=2.446, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="noaux_tc", scoring_func="sigmoid",
        n_group=1, topk_group=1, norm_topk_prob=True, first_k_dense_replace=1, max_position_embeddings=8192,
        rope_theta=50000.0, rope_scaling=None, rms_norm_eps=1e-5, bos_token_id=163584, eos_token_id=163586,
    ),
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1,
        n_routed_experts=256, num_experts_per_tok=8, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="noaux_tc", scoring_func="sigmoid",
        n_group=8, topk_group=4, norm_topk_prob=True, first_k_dense_replace=3, max_position_embeddings=163840,
        rope_theta=10000.0, rms_norm_eps=1e-6, num_nextn_predict_layers=1,
        rope_scaling=dict(type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                          original_max_position_embeddings=4096),
        bos_token_id=0, eos_token_id=1,
        quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                 weight_block_size=[128, 128]),
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", scoring_func="softmax",
        n_group=1, topk_group=1, norm_topk_prob=False, first_k_dense_replace=1, max_position_embeddings=163840,
        rope_theta=10000.0, rms_norm_eps=1e-6,
        rope_scaling=dict(type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
                          original_max_position_embeddings=4096),
        bos_token_id=100000, eos_token_id=100001,
    ),
    "kimi-linear-48b-a3b": _KIMI_LINEAR_48B,
    # Forecast: K2's design scaled up (more layers, wider experts pool) with a 1M-token YaRN context.
    "kimi-k3-forecast": {
        **_K2, "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64, "q_lora_rank": 2048,
        "n_routed_experts": 640, "num_experts_per_tok": 10, "moe_intermediate_size": 2560, "intermediate_size": 20480,
        "max_position_embeddings": 1048576,
        "rope_scaling": dict(type="yarn", factor=256.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                             original_max_position_embeddings=4096),
    },
}


def preset(name: str) -> ModelConfig:
    """A named preset as a ModelConfig (a fresh copy each call)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict(copy.deepcopy(PRESETS[name]))
