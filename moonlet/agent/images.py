"""Images in the agent's context: recognizing image files, sizing them, making the Anthropic image
block a tool result carries, and estimating what an image costs in tokens.

A file is an image when its first bytes say so (PNG, JPEG, GIF, WebP magic numbers), whatever its
name. What the model gets depends on whether it has vision (``AgentConfig.vision``):

- with vision: a short text block naming the image (``[image: PATH — PNG 640x480, 12,345 bytes]``)
  and the image block itself, ``{"type": "image", "source": {"type": "base64", "media_type",
  "data"}}``. An image with a side over ``MAX_LONG_SIDE`` (1568 px, what Claude Code sends at most)
  or over the server's limits (``MAX_IMAGE_BYTES`` decoded, ``MAX_IMAGE_SIDE`` a side) is first
  downscaled with Pillow to fit ``MAX_LONG_SIDE``, and the note says so. One that still does not fit
  (or cannot be decoded) is replaced by a text note saying why;
- without vision: only a text note (``this model cannot see images; 12,345-byte PNG, 640x480``).

The image block keeps a private ``_source`` key (the path or tool it came from); private keys are
dropped before a request is sent (``stream.wire_message``), and compaction uses it to name the image
in the summary (``[image: PATH]``).

Token estimates use the K2.5 processor's rule (``moonlet.multimodal.plan_resize``, repeated here so
the agent needs no torch): the image is shrunk to at most 16,384 patches of 14 px (and 512 a side),
then padded to multiples of 28 px; each 2x2 group of patches is one token."""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}
MAX_IMAGE_BYTES = 10 * 2**20   # the server's limit per image, decoded (docs/serving.md "Image input")
MAX_IMAGE_SIDE = 8000          # the server's limit, pixels a side
MAX_LONG_SIDE = 1568           # larger images are downscaled to this long side before they are sent
PATCH, MERGE, PATCH_LIMIT, SIDE_LIMIT = 14, 2, 16384, 512  # K2.5 media_proc_cfg (published values)


def sniff(data: bytes) -> str | None:
    """The media type the bytes start with (png, jpeg, gif, webp), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def image_size(data: bytes, media_type: str | None = None) -> tuple[int, int] | None:
    """(width, height) read from the header alone (no decoding, no Pillow); None if it cannot be read."""
    media_type = media_type or sniff(data)
    try:
        if media_type == "image/png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if media_type == "image/gif" and len(data) >= 10:
            return struct.unpack("<HH", data[6:10])
        if media_type == "image/jpeg":
            return _jpeg_size(data)
        if media_type == "image/webp":
            return _webp_size(data)
    except struct.error:
        return None
    return None


def image_tokens(width: int, height: int) -> int:
    """Tokens K2.5 spends on a width x height image (the processor's resize rule, then one token per
    2x2 patch group)."""
    width, height = max(1, width), max(1, height)
    by_count = math.sqrt(PATCH_LIMIT / (max(1.0, width // PATCH) * max(1.0, height // PATCH)))
    scale = min(1.0, by_count, SIDE_LIMIT * PATCH / width, SIDE_LIMIT * PATCH / height)
    factor = PATCH * MERGE
    new_w = min(max(1, int(width * scale)), SIDE_LIMIT * PATCH)
    new_h = min(max(1, int(height * scale)), SIDE_LIMIT * PATCH)
    return math.ceil(new_w / factor) * math.ceil(new_h / factor)


FALLBACK_IMAGE_TOKENS = image_tokens(MAX_LONG_SIDE, MAX_LONG_SIDE)  # an image whose size cannot be read
_token_cache: dict[str, int] = {}


def block_tokens(block: dict) -> int:
    """Estimated tokens of one image block (the K2.5 count for its size; cached by its data)."""
    source = block.get("source") or {}
    data = source.get("data")
    if not isinstance(data, str):
        return FALLBACK_IMAGE_TOKENS
    n = _token_cache.get(data)
    if n is None:
        try:
            head = base64.b64decode(data[:65536 - 65536 % 4] if len(data) > 65536 else data, validate=False)
        except (binascii.Error, ValueError):
            head = b""
        size = image_size(head, source.get("media_type"))
        n = image_tokens(*size) if size else FALLBACK_IMAGE_TOKENS
        if len(_token_cache) > 4096:
            _token_cache.clear()
        _token_cache[data] = n
    return n


def _describe(media_type: str, size: tuple[int, int] | None, nbytes: int) -> str:
    dims = f", {size[0]}x{size[1]}" if size else ""
    return f"{MEDIA_TYPES.get(media_type, media_type)}{dims}, {nbytes:,} bytes"


def _downscale(data: bytes, media_type: str) -> tuple[bytes, str, tuple[int, int]]:
    """The image shrunk (aspect kept) to at most MAX_LONG_SIDE a side: PNG and GIF (first frame) become
    PNG, JPEG stays JPEG (quality 90), WebP stays WebP; a PNG still over the byte limit becomes JPEG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        w, h = img.size
        scale = min(1.0, MAX_LONG_SIDE / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB").resize(size, Image.LANCZOS)
    fmt = {"image/jpeg": "JPEG", "image/webp": "WEBP"}.get(media_type, "PNG")
    out = io.BytesIO()
    if fmt == "JPEG":
        small.convert("RGB").save(out, "JPEG", quality=90)
    else:
        small.save(out, fmt)
    if out.tell() > MAX_IMAGE_BYTES:
        out = io.BytesIO()
        small.convert("RGB").save(out, "JPEG", quality=85)
        fmt = "JPEG"
    return out.getvalue(), {"JPEG": "image/jpeg", "WEBP": "image/webp"}.get(fmt, "image/png"), size


def image_content(data: bytes, media_type: str, label: str, vision: bool) -> list[dict]:
    """Content blocks for an image (from a file or a tool): a text note, then the image block when the
    model has vision and the image fits (downscaled where needed); see the module docstring."""
    size = image_size(data, media_type)
    what = _describe(media_type, size, len(data))
    if not vision:
        dims = f", {size[0]}x{size[1]}" if size else ""
        return [{"type": "text", "text": f"[image: {label}] this model cannot see images; {len(data):,}-byte "
                                         f"{MEDIA_TYPES.get(media_type, media_type)}{dims}"}]
    if media_type not in MEDIA_TYPES:
        return [{"type": "text", "text": f"[image: {label}] {media_type} images cannot be sent to the model "
                                         f"(png, jpeg, gif and webp can); {len(data):,} bytes"}]
    note = f"[image: {label} — {what}]"
    too_big = len(data) > MAX_IMAGE_BYTES or size is None or max(size) > MAX_LONG_SIDE
    if too_big:
        try:
            data, media_type, new = _downscale(data, media_type)
        except Exception as e:  # Pillow cannot read it: say so rather than send what the server would refuse
            return [{"type": "text", "text": f"[image: {label}] could not be decoded to be sent ({type(e).__name__}: "
                                             f"{e}); {what}"}]
        if size is not None and new != tuple(size):
            note = f"[image: {label} — {what}; downscaled to {new[0]}x{new[1]} ({len(data):,} bytes) to fit " \
                   f"{MAX_LONG_SIDE} px a side]"
        if len(data) > MAX_IMAGE_BYTES:
            return [{"type": "text", "text": f"[image: {label}] too large to send even after downscaling "
                                             f"({len(data):,} bytes > {MAX_IMAGE_BYTES:,}); {what}"}]
    return [{"type": "text", "text": note},
            {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                         "data": base64.b64encode(data).decode("ascii")}, "_source": label}]


def is_image_block(block) -> bool:
    return isinstance(block, dict) and block.get("type") == "image"


def strip_image_data(content):
    """A copy of tool-result content with each image's base64 data replaced by its size (for records
    that need not hold the bytes twice, such as the tool_calls table)."""
    if not isinstance(content, list):
        return content
    out = []
    for b in content:
        if is_image_block(b) and isinstance((b.get("source") or {}).get("data"), str):
            source = dict(b["source"])
            source["data"] = f"<{len(source['data']) * 3 // 4:,} bytes of base64, kept in the transcript message>"
            b = dict(b, source=source)
        out.append(b)
    return out
