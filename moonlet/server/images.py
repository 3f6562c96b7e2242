"""Image input for the HTTP APIs (models with a vision tower, K2.5 / K2.6).

Images arrive inline only: Anthropic ``image`` blocks with a ``base64`` source, OpenAI ``image_url``
parts and Responses ``input_image`` parts with ``data:image/...;base64,`` URLs. The server never
fetches a URL (``url`` sources and http(s) URLs are a 400 saying so). Each image is checked here,
where the error can name its place in the request: a media type of png, jpeg, gif or webp, at most
``MAX_IMAGE_BYTES`` decoded bytes, data that decodes as that format, at most ``MAX_IMAGE_SIDE`` pixels
a side; at most ``MAX_IMAGES`` images per request.

An image part becomes the K2.5 placeholder text (``<|media_begin|>image<|media_content|><|media_pad|>
<|media_end|>``, ``moonlet.multimodal.IMAGE_PLACEHOLDER``) at its place in the message's content, and
the decoded image is collected, in the order the placeholders appear in the rendered prompt; the
engine expands each placeholder to the image's token count (``EngineCore.prepare_prompt``).
"""

from __future__ import annotations

import base64
import binascii
import io

from ..multimodal import IMAGE_PLACEHOLDER
from .errors import APIError, invalid

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}
MAX_IMAGE_BYTES = 10 * 2**20  # decoded bytes per image
MAX_IMAGE_SIDE = 8000  # pixels, width and height
MAX_IMAGES = 100  # per request


def no_vision(where: str, kind: str = "image"):
    """The 400 for an image sent to a text-only model."""
    return invalid(f"{where} is an {kind} part, but this model has no vision (it reads text only); remove the "
                   f"{kind} or describe it in text", param=where)


class Images:
    """The images of one request, in prompt order, and whether the model can take them."""

    def __init__(self, vision: bool):
        self.vision = vision
        self.images: list = []

    def add(self, data: bytes, media_type: str, where: str) -> str:
        """Check and decode one image; returns the placeholder text that stands for it in the content."""
        if not self.vision:
            raise no_vision(where)
        if len(self.images) >= MAX_IMAGES:
            raise invalid(f"{where}: a request may hold at most {MAX_IMAGES} images", param=where)
        self.images.append(decode_image(data, media_type, where))
        return IMAGE_PLACEHOLDER

    def add_file(self, data: bytes, where: str) -> str:
        """An image read from an uploaded file (a Responses ``input_image`` ``file_id``): its type is
        recognized from its first bytes; returns its placeholder."""
        media_type = sniff_image_type(data)
        if media_type is None:
            raise invalid(f"{where}: the file is not a PNG, JPEG, GIF or WebP image", param=where)
        return self.add(data, media_type, where)

    def add_decoded(self, image, where: str) -> str:
        """An image made by the server itself (a PDF page rendered by ``documents``), as an RGB Pillow image
        within the size limits; returns its placeholder. Only the per-request count is checked here."""
        if not self.vision:
            raise no_vision(where)
        if len(self.images) >= MAX_IMAGES:
            raise invalid(f"{where}: a request may hold at most {MAX_IMAGES} images (PDF pages sent as images "
                          f"count too)", param=where)
        self.images.append(image)
        return IMAGE_PLACEHOLDER

    def add_base64(self, data, media_type, where: str, part: str | None = None) -> str:
        """An image given as base64 text (``data`` at ``where + '.data'``) of ``media_type``; ``part``: where
        the image part itself is (named when the model has no vision)."""
        if not self.vision:
            raise no_vision(part or where)
        check_media_type(media_type, f"{where}.media_type")
        if not isinstance(data, str) or not data:
            raise invalid(f"{where}.data must be the image's bytes as a base64 string", param=f"{where}.data")
        return self.add(b64decode(data, f"{where}.data"), media_type, where)

    def add_url(self, url, where: str, part: str | None = None) -> str:
        """An image given as a URL (at ``where``): a ``data:image/<type>;base64,`` URL; anything else is a 400."""
        if not self.vision:
            raise no_vision(part or where)
        if not isinstance(url, str) or not url:
            raise invalid(f"{where} must be a data URL ('data:image/png;base64,...')", param=where)
        if not url.startswith("data:"):
            raise invalid(f"{where}: this server does not fetch image URLs ({url[:40]!r}...); send the image inline "
                          f"as a data URL ('data:image/png;base64,...')", param=where)
        header, sep, payload = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64":
            raise invalid(f"{where} must be a base64 data URL: 'data:image/<png|jpeg|gif|webp>;base64,<data>'",
                          param=where)
        check_media_type(media_type, where)
        return self.add(b64decode(payload, where), media_type, where)


def check_media_type(media_type, where: str) -> None:
    if media_type not in MEDIA_TYPES:
        raise invalid(f"{where}: image media type {media_type!r} is not supported; use one of "
                      f"{', '.join(MEDIA_TYPES)}", param=where)


def b64decode(data: str, where: str) -> bytes:
    if len(data) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise invalid(f"{where}: the image is larger than this server's limit of {MAX_IMAGE_BYTES} bytes",
                      param=where)
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise invalid(f"{where} is not valid base64: {e}", param=where) from None


def sniff_image_type(data: bytes) -> str | None:
    """The media type of an image's bytes by their signature (None: not one this server decodes)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def decode_image(data: bytes, media_type: str, where: str):
    """The image as an RGB Pillow image, or a 400 naming ``where``."""
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(f"{where}: the image has {len(data)} bytes, over this server's limit of {MAX_IMAGE_BYTES}",
                      param=where)
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data), formats=[MEDIA_TYPES[media_type]])
        width, height = image.size
        if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
            raise invalid(f"{where}: the image is {width}x{height} pixels, over this server's limit of "
                          f"{MAX_IMAGE_SIDE} pixels a side; shrink it", param=where)
        image.load()
        return image.convert("RGB")
    except APIError:
        raise
    except Exception as e:  # Pillow raises several types for bad data
        raise invalid(f"{where}: the data does not decode as a {media_type} image ({type(e).__name__}: {e})",
                      param=where) from None


def join_content(parts: list[tuple[str, str]], sep: str) -> str:
    """Content text from ('text', s) and ('image', placeholder) parts in order: texts are joined by ``sep``,
    an image's placeholder stands right between its neighbours (no separator around it)."""
    out, prev = [], None
    for kind, text in parts:
        if prev == "text" and kind == "text":
            out.append(sep)
        out.append(text)
        prev = kind
    return "".join(out)
