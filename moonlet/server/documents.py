"""Documents for the HTTP APIs: PDFs and text documents become prompt text (and, for models with vision,
PDF pages also become images).

Where documents come from:
- Anthropic Messages ``document`` blocks (``anthropic_convert``), in user turns and tool results: a
  ``base64`` source (``application/pdf``), a ``text`` source, or a ``content`` source (text and image
  blocks); ``title`` and ``context`` go into the prompt. A ``url`` or ``file`` source is a 400: the server
  fetches nothing and has no Anthropic Files API (send the PDF inline).
- OpenAI chat ``file`` parts and Responses ``input_file`` parts (``openai``, ``responses``) in user
  messages: ``file_data`` (a ``data:application/pdf;base64,`` URL, or the bare base64) or ``file_id``, a
  file uploaded to this server's ``/v1/files``; ``filename`` is the title.

A PDF is read with ``moonlet.pdf`` and laid out by ``moonlet.pdf.render_pdf``: ``Document: TITLE``,
``Context: ...``, then ``--- page N ---`` and each page's text, then ``--- end of document ---``. For a model
with vision, when the ``pdf-images`` extra (pypdfium2) is installed, the first ``MAX_PDF_PAGE_IMAGES``
pages are also rendered (``PAGE_IMAGE_SIDE`` px on the long side) and each page's image placeholder
stands right after its marker, the image going through the request's ``Images`` like any other. A PDF
whose pages have no text at all is a 400 when no page image is sent (a text-only model, or no
renderer): the model would see nothing of it.

Limits, each a 400 naming the part: at most ``MAX_PDF_BYTES`` bytes and ``MAX_PDF_PAGES`` pages per PDF;
a PDF that is damaged, not a PDF, or encrypted with a password is refused with the reason.
"""

from __future__ import annotations

import base64
import binascii

from .. import pdf
from .errors import APIError, invalid
from .images import Images

MAX_PDF_BYTES = 32 * 2**20  # decoded bytes per PDF (Anthropic's request size limit)
MAX_PDF_PAGES = 100  # pages per PDF (Anthropic's limit)
MAX_PDF_PAGE_IMAGES = 20  # pages per PDF sent as images to a model with vision; the rest are text only
PAGE_IMAGE_SIDE = 1024  # pixels, the long side of a rendered page

PDF_MEDIA_TYPE = "application/pdf"


def decode_base64_pdf(data, where: str) -> bytes:
    """A PDF given as base64 text (at ``where``) -> its bytes; a 400 naming ``where`` for anything but
    base64 of at most ``MAX_PDF_BYTES`` bytes."""
    if not isinstance(data, str) or not data:
        raise invalid(f"{where} must be the PDF's bytes as a base64 string", param=where)
    if len(data) > (MAX_PDF_BYTES * 4) // 3 + 4 + data.count("\n") + data.count("\r"):
        raise invalid(f"{where}: the PDF is larger than this server's limit of {MAX_PDF_BYTES} bytes; split it "
                      f"and send the parts in separate requests", param=where)
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise invalid(f"{where} is not valid base64: {e}", param=where) from None


def decode_pdf_data_url(url, where: str) -> bytes:
    """``data:application/pdf;base64,...`` (or the bare base64 of a PDF) at ``where`` -> the PDF's bytes."""
    if not isinstance(url, str) or not url:
        raise invalid(f"{where} must be a data URL ('data:application/pdf;base64,...')", param=where)
    if url.startswith(("http://", "https://")):
        raise invalid(f"{where}: this server does not fetch files from URLs ({url[:40]!r}...); send the PDF inline "
                      f"as 'data:application/pdf;base64,...'", param=where)
    if not url.startswith("data:"):
        return decode_base64_pdf(url, where)
    header, sep, payload = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding != "base64":
        raise invalid(f"{where} must be a base64 data URL: 'data:application/pdf;base64,<data>'", param=where)
    if media_type != PDF_MEDIA_TYPE:
        raise invalid(f"{where}: file media type {media_type!r} is not supported; this server reads PDF files "
                      f"({PDF_MEDIA_TYPE!r}); send other documents as text", param=where)
    return decode_base64_pdf(payload, where)


def pdf_document(data: bytes, where: str, images: Images, title: str | None = None,
                 context: str | None = None) -> str:
    """A PDF's prompt text (see the module doc); its page images, if any, are added to ``images``. Every
    problem is a 400 naming ``where`` (the document part)."""
    if len(data) > MAX_PDF_BYTES:
        raise invalid(f"{where}: the PDF has {len(data)} bytes, over this server's limit of {MAX_PDF_BYTES}; split "
                      f"it and send the parts in separate requests", param=where)
    try:
        texts = pdf.page_texts(data, max_pages=MAX_PDF_PAGES)
        placeholders = None
        if images.vision and pdf.page_images_available():
            pages = pdf.render_page_images(data, MAX_PDF_PAGE_IMAGES, PAGE_IMAGE_SIDE)
            placeholders = [images.add_decoded(page, where) for page in pages]
    except pdf.PDFError as e:
        raise invalid(f"{where}: {e}", param=where) from None
    if placeholders is None and not any(t.strip() for t in texts):
        why = ("this model reads text only (no vision)" if not images.vision else
               "this server cannot render pages as images (install the pdf-images extra: "
               "pip install 'moonlet[pdf-images]')")
        raise invalid(f"{where}: the PDF has no extractable text on any of its {len(texts)} pages (a scanned or "
                      f"image-only PDF), and {why}; send a PDF with a text layer (run OCR on it first) or the "
                      f"text itself", param=where)
    return pdf.render_pdf(texts, title, context, page_images=placeholders)


def text_document(text: str, title: str | None = None, context: str | None = None) -> str:
    """A text document's prompt text: its header lines (if any), then the text. Without a title or context
    this is the text alone."""
    return "\n".join(pdf.header(title, context) + [text])


def optional_string(value, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise invalid(f"{where} must be a string", param=where)


def file_input(spec: dict, where: str, part: str, images: Images, files=None) -> str:
    """An OpenAI file input -> its prompt text. ``spec`` holds ``file_data`` or ``file_id`` (and
    ``filename``): the ``file`` object of a chat ``file`` part (``where`` its path), or a Responses
    ``input_file`` part itself. ``part``: the part's path, named for problems with the PDF itself.
    ``files``: the server's FileStore (``file_id`` reads from it)."""
    filename = optional_string(spec.get("filename"), f"{where}.filename")
    file_data, file_id = spec.get("file_data"), spec.get("file_id")
    if file_data is not None and file_id is not None:
        raise invalid(f"{where}: give file_data or file_id, not both", param=where)
    if file_data is not None:
        data = decode_pdf_data_url(file_data, f"{where}.file_data")
    elif file_id is not None:
        if not isinstance(file_id, str) or not file_id:
            raise invalid(f"{where}.file_id must be the id of a file uploaded to /v1/files", param=f"{where}.file_id")
        if files is None:
            raise invalid(f"{where}.file_id: this server has no file store; send the PDF inline as file_data "
                          f"'data:application/pdf;base64,...'", param=f"{where}.file_id")
        try:
            meta = files.get(file_id)
            data = files.content(file_id)
        except APIError:
            raise invalid(f"{where}.file_id: no file {file_id!r} on this server; upload it first (POST /v1/files)",
                          param=f"{where}.file_id") from None
        filename = filename or meta.get("filename")
    elif spec.get("file_url") is not None:
        raise invalid(f"{where}.file_url: this server does not fetch files from URLs; send the PDF inline as "
                      f"file_data 'data:application/pdf;base64,...'", param=f"{where}.file_url")
    else:
        raise invalid(f"{where} needs file_data ('data:application/pdf;base64,...') or file_id", param=where)
    if not pdf.is_pdf(data):
        raise invalid(f"{part}: the file is not a PDF (it does not start with '%PDF-'); this server reads PDF "
                      f"files; send other documents as text", param=part)
    return pdf_document(data, part, images, title=filename)
