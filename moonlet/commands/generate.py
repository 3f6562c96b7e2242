"""`moonlet generate [PATH] --prompt ...`: quick greedy or sampled generation with a simple latent cache.

This is the model-level path (one request, a contiguous latent cache, the absorbed attention); the
serving engine (`moonlet.engine`) is what batches, pages and prefix-caches.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (default: the bundled moonlet-tiny)",
                       description="Generate a continuation for one prompt. With --chat the prompt is a user "
                                   "message rendered through the checkpoint's chat template.")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: bundled moonlet-tiny)")
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="render the prompt as a chat user turn (default on; --no-chat for raw text)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image for a K2.5 / K2.6 checkpoint (repeat for several); each goes before the prompt "
                        "text in the user turn, as the chat template places an image part")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, choices=["keep", "dequantize"],
                   help="quantized checkpoints (block FP8, INT4 experts): compute from the stored weights, or "
                        "dequantize them to --dtype while loading (default: keep on GPU, dequantize on CPU)")
    p.set_defaults(func=run)


def resolve_model_path(path: str | None) -> str:
    if path:
        return path
    from ..assets import default_model_path

    return str(default_model_path())


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_tokens: int, stop_ids: set[int], temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, inputs_embeds: torch.Tensor | None = None):
    """Yield generated token ids one at a time (absorbed attention over a DenseLatentCache).

    ``inputs_embeds`` [1, len(prompt_ids), H], when given, replaces the prompt's token embeddings in the
    prefill (image features at the placeholder tokens); the generated tokens are embedded as usual."""
    from ..model import DenseLatentCache

    config = model.config
    if not prompt_ids:
        raise ValueError("the prompt encodes to zero tokens; give a non-empty prompt")
    total = len(prompt_ids) + max_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
            f"{config.max_position_embeddings} tokens; shorten the prompt or lower --max-tokens"
        )
    cache = DenseLatentCache(config, 1, total, device=model.device, dtype=model.dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([prompt_ids], device=model.device)
    embeds = None if inputs_embeds is None else inputs_embeds.to(model.device, model.dtype)
    for _ in range(max_tokens):
        logits = model(ids, kv=cache, inputs_embeds=embeds)[0, -1].float().cpu()
        embeds = None
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = (logits / temperature).softmax(-1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
                probs = probs / probs.sum()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        yield nxt
        if nxt in stop_ids:
            return
        ids = torch.tensor([[nxt]], device=model.device)


def run(args) -> int:
    from ..tokenizer import IncrementalDetokenizer, Tokenizer
    from ..weights import load_model

    path = resolve_model_path(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    args.quantization = args.quantization or ("keep" if torch.device(args.device).type == "cuda" else "dequantize")
    tok = Tokenizer.from_pretrained(path)
    inputs_embeds = None
    if args.image:
        model, prompt_ids, inputs_embeds = _image_prompt(path, tok, args, dtype)
    else:
        model = load_model(path, device=args.device, dtype=dtype, quantized=args.quantization)
        if args.chat:
            prompt_ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True,
                                                 add_generation_prompt=True)
        else:
            prompt_ids = tok.encode(args.prompt)
    stop = set(tok.stop_token_ids) | set(model.config.eos_token_ids)
    detok = IncrementalDetokenizer(tok)
    start, n = time.perf_counter(), 0
    for token in generate_ids(model, prompt_ids, args.max_tokens, stop, args.temperature, args.top_p, args.seed,
                              inputs_embeds=inputs_embeds):
        n += 1
        if token in stop:
            break
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    elapsed = time.perf_counter() - start
    print(f"[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _image_prompt(path: str, tok, args, dtype):
    """Load the image-text model, preprocess ``args.image`` and build the prompt: one image placeholder per
    image before the prompt text, each expanded to its token count. Returns (text model, prompt ids,
    prefill embeddings with the image features in place)."""
    from ..multimodal import (IMAGE_PLACEHOLDER, MEDIA_PAD, ImageProcessorConfig, expand_image_placeholders,
                              preprocess_images)
    from ..weights import load_vision_language_model

    vlm = load_vision_language_model(path, device=args.device, dtype=dtype, quantized=args.quantization)
    pad_id = vlm.placeholder_id
    if tok.special_tokens.get(MEDIA_PAD) != pad_id:
        raise ValueError(f"the tokenizer's {MEDIA_PAD} is {tok.special_tokens.get(MEDIA_PAD)}, but config.json's "
                         f"media_placeholder_token_id is {pad_id}: images need a K2.5 / K2.6 tokenizer")
    cfg = ImageProcessorConfig.from_pretrained(path)
    vc = vlm.vision_config
    if (cfg.patch_size, cfg.merge_kernel_size) != (vc.patch_size, vc.merge_kernel_size[0]) or \
            vc.merge_kernel_size[0] != vc.merge_kernel_size[1]:
        raise ValueError(f"preprocessor_config.json (patch {cfg.patch_size}, merge {cfg.merge_kernel_size}) does not "
                         f"match vision_config (patch {vc.patch_size}, merge {list(vc.merge_kernel_size)})")
    batch = preprocess_images(list(args.image), cfg)
    text = IMAGE_PLACEHOLDER * len(args.image) + args.prompt
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
    else:
        ids = tok.encode(text)
    ids = expand_image_placeholders(ids, batch.num_tokens, pad_id)
    with torch.no_grad():
        input_ids = torch.tensor([ids], device=vlm.device)
        embeds = vlm.embed(input_ids, batch.pixel_values.to(vlm.device), batch.grid_thws)
    return vlm.language_model, ids, embeds
