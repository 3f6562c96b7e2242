"""Tiny random configs and checkpoints of the K2 family, for tests, examples and benchmarks."""

from __future__ import annotations

from .config import ModelConfig


def tiny_k2_config(**overrides) -> ModelConfig:
    """K2-like: q-LoRA, YaRN, sigmoid noaux_tc router with n_group > 1, a dense first layer."""
    cfg = dict(
        model_type="kimi_k2", vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
        routed_scaling_factor=2.827, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=24, topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2,
        norm_topk_prob=True, first_k_dense_replace=1, max_position_embeddings=4096, rope_theta=50000.0,
        rope_scaling=dict(type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                          original_max_position_embeddings=128),
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, torch_dtype="float32",
    )
    cfg.update(overrides)
    return ModelConfig.from_dict(cfg)


def tiny_v2_lite_config(**overrides) -> ModelConfig:
    """DeepSeek-V2-Lite-like: no q-LoRA, softmax greedy router without renormalization."""
    cfg = dict(
        model_type="deepseek_v2", vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2,
        routed_scaling_factor=1.0, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False,
        first_k_dense_replace=1, max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
                          original_max_position_embeddings=128),
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, torch_dtype="float32",
    )
    cfg.update(overrides)
    return ModelConfig.from_dict(cfg)


def tiny_kimi_linear_config(**overrides) -> ModelConfig:
    """Kimi-Linear-shaped: KDA, KDA, KDA, NoPE MLA; a dense first layer, then sigmoid-routed experts
    (the published config's own key spellings)."""
    cfg = dict(
        model_type="kimi_linear", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_token=2,
        num_shared_experts=1, first_k_dense_replace=1, moe_layer_freq=1, moe_renormalize=True,
        moe_router_activation_func="sigmoid", routed_scaling_factor=2.446, use_grouped_topk=True,
        num_expert_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, mla_use_nope=True, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=False, torch_dtype="float32", bos_token_id=0, eos_token_id=1,
        linear_attn_config=dict(kda_layers=[1, 2, 3], full_attn_layers=[4], num_heads=2, head_dim=8,
                                short_conv_kernel_size=4),
    )
    cfg.update(overrides)
    return ModelConfig.from_dict(cfg)


def greedy_reference(model, prompt, num_tokens: int) -> list[int]:
    """Plain greedy decoding with no cache: the whole sequence re-run through ``model`` every step (the
    independent reference the engine's outputs are compared with)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def random_model(config: ModelConfig, seed: int = 0, bias_std: float = 0.05):
    """A randomly initialized Transformer with a non-zero router correction bias."""
    import torch

    from .model import Transformer

    model = Transformer(config).init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * bias_std)
    return model.eval()


_TINY_BPE_CACHE: dict[int, dict[bytes, int]] = {}


def _tiny_corpus() -> list[str]:
    """A few KB of built-in text: the Zen of Python, some stdlib docstrings and a little of other scripts."""
    import codecs
    import contextlib
    import io
    import json
    import re
    import string
    import textwrap

    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen the first time
        import this
    texts = [codecs.decode(this.s, "rot13")]
    texts += [m.__doc__ or "" for m in (json, re, string, textwrap)]
    texts.append("def add(a: int, b: int) -> int:\n    return a + b\n\nprint(add(2, 3))  # 5\n")
    texts.append("天气很好。北京欢迎你！ こんにちは世界。 Привет, мир! Ωμέγα. café naïve 😀🎉 1234567890\n")
    return texts


def tiny_tokenizer_dir(directory, vocab_size: int = 512, chat_template: str = "kimi-k2"):
    """Write a small but complete tokenizer directory (tiktoken.model, tokenizer_config.json,
    chat_template.jinja) into `directory` and return its Path.

    The BPE (`vocab_size` base tokens; the tokenizer adds K2's 256 special slots after them) is
    trained on a few KB of built-in text, once per process and size."""
    from pathlib import Path

    from .tokenizer import Tokenizer

    directory = Path(directory)
    Tokenizer(_tiny_bpe(vocab_size), name_or_path="moonlet-tiny-test").save_pretrained(
        directory, chat_template=chat_template)
    return directory


def _tiny_bpe(vocab_size: int) -> dict[bytes, int]:
    """The tiny BPE ranks of ``vocab_size`` tokens, trained once per process and size."""
    from .train.bpe import train_bpe

    if vocab_size not in _TINY_BPE_CACHE:
        _TINY_BPE_CACHE[vocab_size] = train_bpe(_tiny_corpus(), vocab_size, min_frequency=1)
    return _TINY_BPE_CACHE[vocab_size]


# A tiny MoonViT (the K2.5 / K2.6 vision tower) in the published config's key spelling: 4-px patches,
# width 16, two blocks, merged 2 x 2 into a 64-wide text model (tiny_k2_config's hidden size).
TINY_VISION_CONFIG = dict(
    patch_size=4, init_pos_emb_height=6, init_pos_emb_width=5, init_pos_emb_time=4, vt_hidden_size=16,
    vt_num_attention_heads=2, vt_intermediate_size=24, vt_num_hidden_layers=2, merge_kernel_size=[2, 2],
    mm_hidden_size=16, mm_projector_type="patchmerger", merge_type="sd2_tpool", pos_emb_type="divided_fixed",
    projector_hidden_act="gelu", projector_ln_eps=1e-5, video_attn_type="spatial_temporal", text_hidden_size=64,
    model_type="")


def tiny_image_processor():
    """The image-processor settings that match TINY_VISION_CONFIG (4-px patches, 2 x 2 merge)."""
    from .multimodal import ImageProcessorConfig

    return ImageProcessorConfig(patch_size=4, merge_kernel_size=2)


def tiny_vision_tokenizer_dir(directory, chat_template: str = "kimi-k2.6"):
    """``tiny_tokenizer_dir`` whose special slots also name K2.5's media tokens (``<|media_begin|>``,
    ``<|media_content|>``, ``<|media_end|>``, ``<|media_pad|>``), for image-text tests; returns its Path."""
    from pathlib import Path

    from .tokenizer import K2_SPECIAL_TOKENS, Tokenizer

    names = {512 + slot: name for slot, name in K2_SPECIAL_TOKENS.items()}
    names.update({512 + 18: "<|media_begin|>", 512 + 19: "<|media_content|>", 512 + 20: "<|media_end|>",
                  512 + 21: "<|media_pad|>"})
    directory = Path(directory)
    Tokenizer(_tiny_bpe(512), {name: i for i, name in names.items()}).save_pretrained(
        directory, chat_template=chat_template)
    return directory


def tiny_pdf(pages: list[str], page_size: tuple[int, int] = (200, 200)) -> bytes:
    """A minimal valid PDF (1.4, one Helvetica font, a correct xref table) whose page i shows the lines of
    ``pages[i]`` (ASCII), top to bottom; an empty string makes a page with no text. Written by hand,
    so tests know exactly what text each page holds, independently of any PDF library."""
    width, height = page_size
    objects: list[bytes] = []  # object i + 1

    def escape(line: str) -> str:
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    n = len(pages)
    font_id, pages_id = 3 + 2 * n, 2
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    for i, text in enumerate(pages):
        ops = [f"BT /F1 10 Tf 12 TL 10 {height - 20} Td"]
        for line in text.split("\n") if text else []:
            ops.append(f"({escape(line)}) Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1") if text else b""
        objects.append(f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 {width} {height}] "
                       f"/Resources << /Font << /F1 {font_id} 0 R >> >> /Contents {4 + 2 * i} 0 R >>".encode())
        objects.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects):
        offsets.append(len(out))
        out += f"{i + 1} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def random_adapter(model, directory, r: int = 4, alpha: float = 8.0, targets=None, seed: int = 0,
                   std: float = 0.2):
    """Write a PEFT LoRA adapter for ``model`` to ``directory`` with random nonzero factors (A and B drawn
    from normal(0, std)), so that it changes the model's outputs. ``targets``: module-name suffixes
    (default: moonlet.model.lora's DEFAULT_TARGETS). ``model`` itself is not changed. Returns the path."""
    import copy

    import torch

    from .model.lora import LoraSettings, add_lora, save_adapter

    settings = LoraSettings(r=r, alpha=alpha) if targets is None else LoraSettings(r=r, alpha=alpha,
                                                                                    targets=tuple(targets))
    wrapped = copy.deepcopy(model)
    add_lora(wrapped, settings, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return save_adapter(wrapped, directory)
