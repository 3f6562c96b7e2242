"""PDF documents as text (and, with the optional renderer, as page images), for the HTTP APIs' document
parts (``moonlet.server.documents``) and the agent's read_file.

Text comes from pypdf (pure Python, a core dependency): each page's ``extract_text()``, in page order.
A PDF encrypted with an empty user password (an "owner password" only: it opens without asking) is
read; one that needs a password is refused. Page images come from pypdfium2 (PDFium's bindings), the
``pdf-images`` extra: ``pip install moonlet[pdf-images]``; without it ``page_images_available()`` is
False and callers use the text alone.

``render_pdf`` lays a document out as text the same way wherever it is used, so a prompt is
deterministic: an optional header (``Document: TITLE``, ``Context: ...``), then per page a marker line
``--- page N ---`` and the page's text (a page with no text layer gets a bracketed note), then
``--- end of document ---``.
"""

from __future__ import annotations

import importlib.util
import io
import re

PDF_MAGIC = b"%PDF-"


class PDFError(ValueError):
    """A PDF that cannot be read: not a PDF, damaged, encrypted, or over a limit. The message says
    which and what to do; callers add where the PDF came from."""


def is_pdf(data: bytes) -> bool:
    """Whether ``data`` starts like a PDF (the header may follow up to 1 KiB of junk, as readers allow)."""
    return PDF_MAGIC in data[:1024]


def _open(data: bytes):
    import pypdf

    if not is_pdf(data):
        raise PDFError(f"the data is not a PDF (it does not start with '%PDF-'; it starts with {data[:8]!r})")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
    except Exception as e:  # pypdf raises many types for damaged files
        raise PDFError(f"the PDF could not be read ({type(e).__name__}: {e}); check that the file is complete "
                       f"and not damaged") from None
    if reader.is_encrypted:
        try:
            opened = reader.decrypt("")
        except Exception as e:  # an unsupported algorithm, or a crypto library missing
            raise PDFError(f"the PDF is encrypted and could not be opened ({type(e).__name__}: {e}); send a "
                           f"decrypted copy") from None
        if not opened:
            raise PDFError("the PDF is encrypted with a password; send a decrypted copy (e.g. `qpdf --decrypt "
                           "--password=PASSWORD in.pdf out.pdf`)")
    return reader


def page_count(data: bytes) -> int:
    """The number of pages of a PDF (a PDFError when it cannot be read)."""
    reader = _open(data)
    try:
        return len(reader.pages)
    except Exception as e:
        raise PDFError(f"the PDF's page tree could not be read ({type(e).__name__}: {e})") from None


def page_texts(data: bytes, first: int = 1, last: int | None = None, max_pages: int | None = None) -> list[str]:
    """The text of pages ``first``..``last`` (1-based, inclusive; ``last`` None: the last page), in order.
    ``max_pages``: a PDF with more pages (in all) is refused before any text is extracted."""
    reader = _open(data)
    try:
        count = len(reader.pages)
    except Exception as e:
        raise PDFError(f"the PDF's page tree could not be read ({type(e).__name__}: {e})") from None
    if max_pages is not None and count > max_pages:
        raise PDFError(f"the PDF has {count} pages, over the limit of {max_pages}; split it and send the parts "
                       f"in separate requests, or send the pages you need")
    if count == 0:
        raise PDFError("the PDF has no pages")
    last = count if last is None else min(last, count)
    texts = []
    for n in range(first, last + 1):
        try:
            text = reader.pages[n - 1].extract_text() or ""
        except Exception as e:
            raise PDFError(f"page {n} of the PDF could not be read ({type(e).__name__}: {e})") from None
        texts.append(_clean(text))
    return texts


def _clean(text: str) -> str:
    """A page's text with line ends normalized and trailing blanks (spaces, empty lines) removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def page_marker(n: int) -> str:
    return f"--- page {n} ---"


END_MARKER = "--- end of document ---"


def empty_page_note(n: int) -> str:
    return f"[page {n} has no text layer (a scanned or image-only page)]"


def header(title: str | None, context: str | None) -> list[str]:
    """The document's header lines: ``Document: TITLE`` and ``Context: ...`` for those given."""
    lines = []
    if title:
        lines.append(f"Document: {title}")
    if context:
        lines.append(f"Context: {context}")
    return lines


def render_pdf(texts: list[str], title: str | None = None, context: str | None = None, first: int = 1,
               page_images: list[str] | None = None) -> str:
    """The prompt text of a PDF's pages ``first``.. (``texts``): the header, then per page its marker,
    the page's image placeholder when ``page_images`` has one for it, and its text (or the empty-page
    note), then the end marker. ``page_images[i]`` belongs to page ``first + i``."""
    lines = header(title, context)
    for i, text in enumerate(texts):
        n = first + i
        lines.append(page_marker(n))
        if page_images is not None and i < len(page_images):
            lines.append(page_images[i])
        lines.append(text if text.strip() else empty_page_note(n))
    lines.append(END_MARKER)
    return "\n".join(lines)


def page_images_available() -> bool:
    """Whether the page renderer (pypdfium2, the ``pdf-images`` extra) is installed."""
    return importlib.util.find_spec("pypdfium2") is not None


def render_page_images(data: bytes, count: int, long_side: int) -> list:
    """The first ``count`` pages as RGB Pillow images whose longer side is ``long_side`` pixels (aspect
    kept), rendered by PDFium. A PDFError when PDFium cannot open or draw the file."""
    import pypdfium2

    try:
        doc = pypdfium2.PdfDocument(data)
    except Exception as e:
        raise PDFError(f"the PDF's pages could not be rendered ({type(e).__name__}: {e})") from None
    try:
        out = []
        for i in range(min(count, len(doc))):
            page = doc[i]
            try:
                width, height = page.get_size()  # points
                scale = long_side / max(width, height, 1.0)
                out.append(page.render(scale=scale).to_pil().convert("RGB"))
            except Exception as e:
                raise PDFError(f"page {i + 1} of the PDF could not be rendered ({type(e).__name__}: {e})") from None
            finally:
                page.close()
        return out
    finally:
        doc.close()


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_page_range(spec: str) -> tuple[int, int]:
    """``"3"`` -> (3, 3), ``"2-5"`` -> (2, 5); 1-based and inclusive. A ValueError saying the accepted
    forms for anything else."""
    m = _RANGE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"pages {spec!r} is not a page range; give one page ('3') or a range ('2-5'), 1-based")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else first
    if first < 1 or last < first:
        raise ValueError(f"pages {spec!r}: the range must start at 1 or later and not end before it starts")
    return first, last
