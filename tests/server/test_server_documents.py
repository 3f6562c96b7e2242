"""Documents and PDFs through the HTTP APIs: Anthropic ``document`` blocks (base64 PDFs, text and content
sources, in user turns and tool results), OpenAI chat ``file`` parts (inline and uploaded ``file_id``) and
Responses ``input_file`` parts. The PDFs are written by hand in the tests (``moonlet.testing.tiny_pdf``), so
the reference is the text put on each page: the prompt the engine receives must equal the chat template
applied to that text laid out page by page. Every bad document is a 400 naming its place."""

import base64
import io

import anthropic
import httpx
import numpy as np
import openai
import pytest
from server_support import Script

from moonlet.multimodal import IMAGE_PLACEHOLDER
from moonlet.server import documents
from moonlet.server.anthropic import CountTokensRequest
from moonlet.server.anthropic_convert import to_conversation
from moonlet.testing import tiny_pdf

PAGES = ["Alpha page one\nwith a second line", "Beta page two (the end)"]
H = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pdf_block(data: bytes, **extra) -> dict:
    return {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64(data)},
            **extra}


def laid_out(pages: list[str], title: str | None = None, context: str | None = None) -> str:
    """The documented layout, written out independently of the server's code."""
    head = ([f"Document: {title}"] if title else []) + ([f"Context: {context}"] if context else [])
    body = []
    for n, text in enumerate(pages, 1):
        body += [f"--- page {n} ---", text or f"[page {n} has no text layer (a scanned or image-only page)]"]
    return "\n".join(head + body + ["--- end of document ---"])


def encrypted(pages: list[str], user_password: str) -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(tiny_pdf(pages))))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def template(tok, content: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=True, thinking=False)


@pytest.fixture()
def client(scripted):
    return anthropic.Anthropic(base_url=scripted.url, api_key="test-key", max_retries=0)


@pytest.fixture()
def oai(scripted):
    return openai.OpenAI(base_url=scripted.url + "/v1", api_key="test-key", max_retries=0)


def test_anthropic_pdf_pages_reach_the_prompt_in_order(client, engine):
    content = [{"type": "text", "text": "Read this:"},
               pdf_block(tiny_pdf(PAGES), title="report.pdf", context="Q3 numbers"),
               {"type": "text", "text": "Summarize."}]
    kwargs = dict(model="m", messages=[{"role": "user", "content": content}], thinking={"type": "disabled"})
    counted = client.messages.count_tokens(**kwargs)
    engine.push(Script("ok"))
    msg = client.messages.create(max_tokens=5, **kwargs)
    want = template(engine.tokenizer, "Read this:\n\n" + laid_out(PAGES, "report.pdf", "Q3 numbers") + "\n\nSummarize.")
    call = engine.calls[-1]
    assert call.prompt_ids == want
    assert counted.input_tokens == len(want) == msg.usage.input_tokens
    text = call.prompt_text
    assert text.index("--- page 1 ---") < text.index("Alpha page one") < text.index("--- page 2 ---") \
        < text.index("Beta page two (the end)") < text.index("--- end of document ---")


def test_pdf_in_a_tool_result_and_blank_pages(client, engine):
    pages = ["First", "", "Third"]
    messages = [{"role": "user", "content": "get it"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_x", "name": "fetch", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": [
                    {"type": "text", "text": "here it is"}, pdf_block(tiny_pdf(pages))]}]}]
    engine.push(Script("ok"))
    client.messages.create(model="m", max_tokens=5, messages=messages, thinking={"type": "disabled"})
    assert "here it is\n" + laid_out(pages) in engine.calls[-1].prompt_text
    assert "[page 2 has no text layer (a scanned or image-only page)]" in engine.calls[-1].prompt_text


def test_text_and_content_documents_with_title_and_context(client, engine):
    content = [{"type": "document", "title": "notes.txt", "context": "from the wiki",
                "source": {"type": "text", "media_type": "text/plain", "data": "plain words"}},
               {"type": "document", "title": "chunks", "citations": {"enabled": False},
                "source": {"type": "content", "content": [{"type": "text", "text": "chunk one"},
                                                          {"type": "text", "text": "chunk two"}]}},
               {"type": "document", "source": {"type": "text", "data": "untitled text"}}]
    engine.push(Script("ok"))
    client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": content}],
                           thinking={"type": "disabled"})
    want = ("Document: notes.txt\nContext: from the wiki\nplain words\n\nDocument: chunks\nchunk one\n\nchunk two"
            "\n\nuntitled text")
    assert engine.calls[-1].prompt_ids == template(engine.tokenizer, want)


def _doc_request(block: dict) -> dict:
    return {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, block]}]}


BAD_DOCUMENTS = [
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "%%% not b64"}},
     "messages.0.content.1.source.data", "not valid base64"),
    (pdf_block(b"just some text, no PDF"), "messages.0.content.1", "not a PDF"),
    (pdf_block(tiny_pdf(PAGES)[:150]), "messages.0.content.1", "could not be read"),
    ({"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": b64(b"hi")}},
     "messages.0.content.1.source.media_type", "must be 'application/pdf'"),
    ({"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
     "messages.0.content.1.source", "does not fetch"),
    ({"type": "document", "source": {"type": "file", "file_id": "file_1"}}, "messages.0.content.1.source",
     "not supported"),
    (pdf_block(tiny_pdf(PAGES), citations={"enabled": True}), "messages.0.content.1.citations",
     "citations are not supported"),
    (pdf_block(tiny_pdf(["", ""])), "messages.0.content.1", "no extractable text on any of its 2 pages"),
    (pdf_block(tiny_pdf(["p"] * 101)), "messages.0.content.1", "101 pages, over the limit of 100"),
    ({"type": "document", "source": {"type": "content", "content": [{"type": "document"}]}},
     "messages.0.content.1.source.content.0", "text and image blocks"),
    ({"type": "document", "title": 3, "source": {"type": "text", "data": "x"}}, "messages.0.content.1.title",
     "must be a string"),
]


@pytest.mark.parametrize("block,where,fragment", BAD_DOCUMENTS)
def test_bad_documents_are_400_naming_the_block(scripted, engine, block, where, fragment):
    for route in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(scripted.url + route, json=_doc_request(block), headers=H, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith(where + ":") or error["message"].startswith(where + " "), error["message"]
        assert fragment in error["message"], error["message"]
    assert engine.calls == []


def test_encrypted_pdfs(client, engine, scripted):
    r = httpx.post(scripted.url + "/v1/messages", json=_doc_request(pdf_block(encrypted(PAGES, "secret"))),
                   headers=H, timeout=30)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith("messages.0.content.1: the PDF is encrypted with a password")
    # an owner password only (opens without asking, as PDF readers do): read as usual
    engine.push(Script("ok"))
    client.messages.create(thinking={"type": "disabled"}, **_doc_request(pdf_block(encrypted(PAGES, ""))))
    assert engine.calls[-1].prompt_ids == template(engine.tokenizer, "look\n\n" + laid_out(PAGES))


def test_pdf_size_limit(scripted, engine, monkeypatch):
    data = tiny_pdf(PAGES)
    # far over: refused from the base64 length, before decoding; just over: from the decoded size
    for limit, start in ((len(data) // 2, f"messages.0.content.1.source.data: the PDF is larger than this "
                                          f"server's limit of {len(data) // 2} bytes"),
                         (len(data) - 1, f"messages.0.content.1: the PDF has {len(data)} bytes, over this server's "
                                         f"limit of {len(data) - 1}")):
        monkeypatch.setattr(documents, "MAX_PDF_BYTES", limit)
        r = httpx.post(scripted.url + "/v1/messages", json=_doc_request(pdf_block(data)), headers=H, timeout=30)
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith(start), r.json()
    monkeypatch.setattr(documents, "MAX_PDF_BYTES", len(data))
    r = httpx.post(scripted.url + "/v1/messages/count_tokens", json=_doc_request(pdf_block(data)), headers=H)
    assert r.status_code == 200


def test_openai_file_part_with_file_data(oai, engine):
    data = tiny_pdf(PAGES)
    engine.push(Script("ok"))
    oai.chat.completions.create(model="m", max_tokens=5, messages=[
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "file", "file": {
            "file_data": "data:application/pdf;base64," + b64(data), "filename": "x.pdf"}}]}],
        extra_body={"chat_template_kwargs": {"thinking": False}})
    want = template(engine.tokenizer, "look\n" + laid_out(PAGES, "x.pdf"))
    assert engine.calls[-1].prompt_ids == want


def test_openai_file_id_reads_the_uploaded_file(oai, engine, scripted):
    data = tiny_pdf(PAGES)
    uploaded = oai.files.create(file=("uploaded.pdf", data, "application/pdf"), purpose="user_data")
    engine.push(Script("ok"))
    oai.chat.completions.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_id": uploaded.id}}]}], extra_body={"chat_template_kwargs": {"thinking": False}})
    assert engine.calls[-1].prompt_ids == template(engine.tokenizer, laid_out(PAGES, "uploaded.pdf"))
    # the Responses API reads the same upload
    engine.push(Script("ok"))
    oai.responses.create(model="m", max_output_tokens=5, reasoning={"effort": "none"}, input=[
        {"role": "user", "content": [{"type": "input_file", "file_id": uploaded.id}]}])
    assert engine.calls[-1].prompt_ids == template(engine.tokenizer, laid_out(PAGES, "uploaded.pdf"))
    text = oai.files.create(file=("notes.txt", b"hello", "text/plain"), purpose="user_data")
    cases = [
        ({"file_id": "file-nope"}, "messages.0.content.0.file.file_id", "no file 'file-nope'"),
        ({"file_id": text.id}, "messages.0.content.0", "not a PDF"),
        ({"file_data": "data:text/plain;base64,aGk="}, "messages.0.content.0.file.file_data", "'text/plain'"),
        ({"file_data": "https://example.com/a.pdf"}, "messages.0.content.0.file.file_data", "does not fetch"),
        ({"filename": "a.pdf"}, "messages.0.content.0.file", "needs file_data"),
        ({"file_data": "data:application/pdf;base64," + b64(encrypted(PAGES, "pw"))}, "messages.0.content.0",
         "encrypted"),
    ]
    for spec, param, fragment in cases:
        r = httpx.post(scripted.url + "/v1/chat/completions", headers={"authorization": "Bearer test-key"}, json={
            "model": "m", "messages": [{"role": "user", "content": [{"type": "file", "file": spec}]}]})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and fragment in error["message"], (spec, error)
    r = httpx.post(scripted.url + "/v1/chat/completions", headers={"authorization": "Bearer test-key"}, json={
        "model": "m", "messages": [{"role": "system", "content": [{"type": "file", "file": {"file_id": uploaded.id}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.0"


def test_responses_input_file_inline(oai, engine):
    data = tiny_pdf(PAGES)
    engine.push(Script("ok"))
    oai.responses.create(model="m", max_output_tokens=5, reasoning={"effort": "none"}, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "look"}, {
            "type": "input_file", "filename": "r.pdf", "file_data": "data:application/pdf;base64," + b64(data)}]}])
    assert engine.calls[-1].prompt_ids == template(engine.tokenizer, "look\n" + laid_out(PAGES, "r.pdf"))


# ---- models with vision: PDF pages also go in as images ---------------------------------------------------
def _vision_conversation(block: dict):
    req = CountTokensRequest(model="m", messages=[{"role": "user", "content": [block]}])
    return to_conversation(req, vision=True)


def _dark_pixels(image) -> np.ndarray:
    return np.asarray(image.convert("L")) < 128


def test_vision_models_get_each_page_as_an_image(monkeypatch):
    pytest.importorskip("pypdfium2")
    pages = ["Dark text on page one", "", "Three"]
    conv = _vision_conversation(pdf_block(tiny_pdf(pages, page_size=(200, 100)), title="t.pdf"))
    content = conv.messages[-1]["content"]
    assert content == "\n".join(["Document: t.pdf",
                                 "--- page 1 ---", IMAGE_PLACEHOLDER, pages[0],
                                 "--- page 2 ---", IMAGE_PLACEHOLDER, "[page 2 has no text layer (a scanned or "
                                 "image-only page)]",
                                 "--- page 3 ---", IMAGE_PLACEHOLDER, pages[2], "--- end of document ---"])
    assert len(conv.images) == 3
    side = documents.PAGE_IMAGE_SIDE
    assert [im.size for im in conv.images] == [(side, side // 2)] * 3  # a 200x100 pt page, long side scaled
    # the line was drawn from 10 pt in, baseline 20 pt down, 10 pt Helvetica (about 110 pt wide): all ink
    # lies in the top quarter, left three quarters; the blank page has no ink at all
    ink = _dark_pixels(conv.images[0])
    assert ink.sum() > 0 and ink[: side // 8, : side * 3 // 4].sum() == ink.sum()
    assert ink[:, : side * 10 // 200 - 2].sum() == 0  # nothing left of the 10 pt margin
    assert _dark_pixels(conv.images[1]).sum() == 0
    # a scanned PDF is fine with page images; the cap leaves later pages as text only
    monkeypatch.setattr(documents, "MAX_PDF_PAGE_IMAGES", 1)
    conv = _vision_conversation(pdf_block(tiny_pdf(["", "Second"])))
    assert len(conv.images) == 1
    assert conv.messages[-1]["content"].count(IMAGE_PLACEHOLDER) == 1
    assert conv.messages[-1]["content"].index(IMAGE_PLACEHOLDER) < conv.messages[-1]["content"].index("--- page 2")


def test_vision_without_the_renderer_is_text_only(monkeypatch):
    monkeypatch.setattr("moonlet.pdf.page_images_available", lambda: False)
    conv = _vision_conversation(pdf_block(tiny_pdf(PAGES)))
    assert conv.images == [] and conv.messages[-1]["content"] == laid_out(PAGES)
    with pytest.raises(Exception, match="pdf-images"):
        _vision_conversation(pdf_block(tiny_pdf([""])))
