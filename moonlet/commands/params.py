"""`moonlet params PRESET|PATH`: parameter counts, latent vs expanded KV-cache size, capacity table."""

from __future__ import annotations

from ..config import PRESET_NOTES, PRESETS, ModelConfig


def register(sub) -> None:
    p = sub.add_parser("params", help="parameter counts and memory needs of a preset or checkpoint",
                       description="Print total and active parameters, KV-cache bytes per token (MLA latent vs "
                                   "expanded per-head K/V) and a capacity table for weights and cache.")
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory / config.json")
    p.set_defaults(func=run)


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1024 or prefix == "P":
            return f"{n:,.1f} {prefix}i{unit}" if prefix else f"{n:,.0f} {unit}"
        n /= 1024
    return f"{n} {unit}"


def _count(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def report(config: ModelConfig, name: str) -> str:
    counts = config.param_counts()
    kv = config.kv_bytes_per_token(2)
    lines = []
    note = PRESET_NOTES.get(name)
    if note:
        lines.append(f"NOTE: {note}")
    kind = f"model_type {config.model_type}"
    if config.outer is not None and config.outer.get("model_type"):
        kind = f"model_type {config.outer['model_type']}, text model {config.model_type}"
    lines.append(f"model          {name} ({kind})")
    lines.append(f"total params   {counts['total']:,} ({_count(counts['total'])})")
    lines.append(f"active params  {counts['active']:,} ({_count(counts['active'])}) per token")
    if config.outer is not None and config.outer.get("vision_config"):
        try:
            vision = config.vision_config.param_counts()
        except ValueError as e:
            lines.append(f"vision         not read: {e}")
        else:
            lines.append(f"vision tower   {vision['vision_tower']:,} ({_count(vision['vision_tower'])}) MoonViT")
            lines.append(f"mm projector   {vision['mm_projector']:,} ({_count(vision['mm_projector'])})")
            both = counts["total"] + vision["total"]
            lines.append(f"with vision    {both:,} ({_count(both)}) total (the counts above are the text model)")
    lines.append(f"context        {config.max_position_embeddings:,} tokens")
    mla_layers = config.num_hidden_layers - len(config.kda_layer_ids)
    lines.append(
        f"KV cache/token {kv['latent']:,} bytes latent ({config.latent_dim} values x {mla_layers} MLA layers, "
        f"bf16) vs {kv['expanded']:,} bytes expanded per-head K/V ({kv['expanded'] / kv['latent']:.1f}x)"
    )
    if config.kda_layer_ids:
        lines.append(f"KDA state/seq  {config.kda_state_bytes():,} bytes ({_human(config.kda_state_bytes())}) over "
                     f"{len(config.kda_layer_ids)} KDA layers, whatever the length")
    lines.append("")
    lines.append("weights        bf16            fp8             int4 (experts) ")
    total = counts["total"]
    expert_params = 0
    for layer in range(config.num_hidden_layers):
        if config.is_moe_layer(layer):
            expert_params += config.n_routed_experts * 3 * config.hidden_size * config.moe_intermediate_size
    int4 = (total - expert_params) * 2 + expert_params * 0.5 + expert_params / 32 * 2
    lines.append(f"               {_human(total * 2):<16}{_human(total * 1):<16}{_human(int4):<16}")
    lines.append("")
    lines.append("KV cache       128K tokens      256K tokens      1M tokens")
    row_latent = "".join(f"{_human(kv['latent'] * n):<17}" for n in (131072, 262144, 1048576))
    row_expanded = "".join(f"{_human(kv['expanded'] * n):<17}" for n in (131072, 262144, 1048576))
    lines.append(f"  latent       {row_latent}")
    lines.append(f"  expanded     {row_expanded}")
    if note:
        lines.append("")
        lines.append("(forecast preset: numbers describe a hypothetical model)")
    return "\n".join(lines)


def run(args) -> int:
    config = ModelConfig.from_pretrained(args.model)
    print(report(config, args.model))
    return 0
