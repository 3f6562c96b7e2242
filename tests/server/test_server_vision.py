"""Images through the HTTP APIs, over the real engine with a tiny K2.5-style image-text model and a tokenizer
that has the media tokens. The OpenAI reply's tokens equal a plain greedy loop over the full multimodal
forward (no cache); the Anthropic and Responses replies to the same conversation equal it; usage and
count_tokens include the image tokens; every malformed image is a 400 naming its place."""

import base64
import io

import anthropic
import httpx
import numpy as np
import openai
import pytest
import torch
from server_support import LiveServer

from moonlet.config import ModelConfig
from moonlet.engine import AsyncLLM
from moonlet.model.vision import VisionLanguageModel, merge_image_features
from moonlet.multimodal import IMAGE_PLACEHOLDER, expand_image_placeholders, preprocess_images
from moonlet.server import create_app
from moonlet.testing import TINY_VISION_CONFIG as TINY_VISION
from moonlet.testing import random_model, tiny_image_processor, tiny_k2_config, tiny_vision_tokenizer_dir
from moonlet.tokenizer import Tokenizer

PROCESSOR = tiny_image_processor()
MAX_TOKENS = 6
NO_THINK = {"thinking": False}


def png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    pytest.importorskip("PIL")
    tok = Tokenizer.from_pretrained(tiny_vision_tokenizer_dir(tmp_path_factory.mktemp("vtok")))
    pad = tok.special_tokens["<|media_pad|>"]
    text = tiny_k2_config(vocab_size=tok.vocab_size, bos_token_id=512, eos_token_id=513)
    cfg = ModelConfig.from_dict({"model_type": "kimi_k25", "media_placeholder_token_id": pad,
                                 "text_config": text.to_dict(), "vision_config": TINY_VISION})
    vlm = VisionLanguageModel(cfg, random_model(cfg, seed=8)).init_vision_weights(9, std=0.05).eval()
    llm = AsyncLLM(model=vlm, tokenizer=tok, image_processor=PROCESSOR, dtype="float32", num_blocks=64,
                   block_size=4, start=False)
    app = create_app(llm, served_model_name="tiny-vl", shutdown_engine_on_exit=True)
    with LiveServer(app) as server:
        yield server, llm, vlm, tok


def expected_prompt(tok, content: str, images: list[bytes]) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False, thinking=False)
    ids = tok.encode(text, allow_special=True)
    return expand_image_placeholders(ids, preprocess_images(images, PROCESSOR).num_tokens,
                                     tok.special_tokens["<|media_pad|>"])


def reference(vlm, tok, ids: list[int], images: list[bytes]) -> list[int]:
    """Greedy decoding over the full multimodal forward, no cache, until a stop token."""
    batch = preprocess_images(images, PROCESSOR)
    stops = set(tok.stop_token_ids) | {513}
    lm, out = vlm.language_model, []
    with torch.no_grad():
        feats = vlm.encode_images(batch.pixel_values, batch.grid_thws)
        for _ in range(MAX_TOKENS):
            seq = torch.tensor([ids + out])
            embeds = merge_image_features(lm.model.embed_tokens(seq), seq, feats, vlm.placeholder_id)
            nxt = int(lm(seq, inputs_embeds=embeds)[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
    return out


IMAGE = png(40, 24, 1)  # grid 6 x 10 -> 15 image tokens
OTHER = png(24, 16, 2)  # grid 4 x 6 -> 6 image tokens


def test_openai_data_url_image_gives_the_reference_tokens(stack):
    server, llm, vlm, tok = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model="tiny-vl", max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
        extra_body={"chat_template_kwargs": NO_THINK},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                               {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                               {"type": "text", "text": "and this"},
                                               {"type": "image_url", "image_url": {"url": data_url(OTHER)}}]}])
    ids = expected_prompt(tok, "Look:" + IMAGE_PLACEHOLDER + "and this" + IMAGE_PLACEHOLDER, [IMAGE, OTHER])
    want = reference(vlm, tok, ids, [IMAGE, OTHER])
    assert [bytes(e.bytes) for e in r.choices[0].logprobs.content][:len(want)] == [tok.decode_bytes([t]) for t in want]
    assert r.usage.prompt_tokens == len(ids) and ids.count(vlm.placeholder_id) == 15 + 6
    # the same request with the images swapped is another prompt: no block holding image tokens is reused
    swapped = client.chat.completions.create(
        model="tiny-vl", max_tokens=MAX_TOKENS, temperature=0, extra_body={"chat_template_kwargs": NO_THINK},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                               {"type": "image_url", "image_url": {"url": data_url(OTHER)}},
                                               {"type": "text", "text": "and this"},
                                               {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}])
    first_image = ids.index(vlm.placeholder_id)
    assert swapped.usage.prompt_tokens_details.cached_tokens <= first_image // 4 * 4


def _anthropic_request(image: bytes):
    return dict(model="tiny-vl", max_tokens=MAX_TOKENS, extra_body={"temperature": 0}, thinking={"type": "disabled"},
                messages=[{"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": base64.b64encode(image).decode()}},
                    {"type": "text", "text": "What is this?"}]}])


def test_anthropic_base64_image_round_trip_and_count_tokens(stack):
    server, llm, vlm, tok = stack
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    ids = expected_prompt(tok, IMAGE_PLACEHOLDER + "What is this?", [IMAGE])
    want = reference(vlm, tok, ids, [IMAGE])
    r = client.messages.create(**_anthropic_request(IMAGE))
    # the same conversation through the OpenAI route (whose tokens are checked against the reference above)
    o = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="tiny-vl", max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
        extra_body={"chat_template_kwargs": NO_THINK},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                               {"type": "text", "text": "What is this?"}]}])
    assert [bytes(e.bytes) for e in o.choices[0].logprobs.content][:len(want)] == [tok.decode_bytes([t]) for t in want]
    text = "".join(b.text for b in r.content if b.type == "text")
    assert text == (o.choices[0].message.content or "")
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(ids)
    count = client.messages.count_tokens(model="tiny-vl", messages=_anthropic_request(IMAGE)["messages"],
                                         thinking={"type": "disabled"})
    assert count.input_tokens == len(ids) == len(tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": IMAGE_PLACEHOLDER + "What is this?"}], add_generation_prompt=True,
        tokenize=False, thinking=False), allow_special=True)) + 15 - 1
    # the same image again: its blocks come from the prefix cache
    again = client.messages.create(**_anthropic_request(IMAGE))
    assert again.usage.cache_read_input_tokens == (len(ids) - 1) // 4 * 4
    assert [b.model_dump() for b in again.content] == [b.model_dump() for b in r.content]


def test_responses_input_image(stack):
    server, llm, vlm, tok = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.responses.create(model="tiny-vl", max_output_tokens=MAX_TOKENS, temperature=0,
                                reasoning={"effort": "none"},
                                input=[{"type": "message", "role": "user", "content": [
                                    {"type": "input_image", "image_url": data_url(OTHER)},
                                    {"type": "input_text", "text": "What is this?"}]}])
    o = client.chat.completions.create(
        model="tiny-vl", max_tokens=MAX_TOKENS, temperature=0, extra_body={"chat_template_kwargs": NO_THINK},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(OTHER)}},
                                               {"type": "text", "text": "What is this?"}]}])
    assert r.output_text == (o.choices[0].message.content or "")
    assert r.usage.input_tokens == o.usage.prompt_tokens == len(expected_prompt(
        tok, IMAGE_PLACEHOLDER + "What is this?", [OTHER]))


def test_responses_input_image_by_file_id_equals_inline(stack):
    """An image uploaded to /v1/files and named by file_id is the same input as the image inline; an
    uploaded file that is not an image is a 400 naming the part."""
    import io

    server, llm, vlm, tok = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    uploaded = client.files.create(file=("picture.png", io.BytesIO(OTHER)), purpose="vision")
    text = client.files.create(file=("notes.txt", io.BytesIO(b"not an image")), purpose="user_data")
    replies = []
    for image in ({"type": "input_image", "file_id": uploaded.id}, {"type": "input_image", "image_url": data_url(OTHER)}):
        r = client.responses.create(model="tiny-vl", max_output_tokens=MAX_TOKENS, temperature=0,
                                    reasoning={"effort": "none"}, input=[{"type": "message", "role": "user", "content": [
                                        image, {"type": "input_text", "text": "What is this?"}]}])
        replies.append((r.output_text, r.usage.input_tokens))
    assert replies[0] == replies[1]
    bad = _post(server, "/v1/responses", {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": text.id}]}]})
    assert bad.status_code == 400 and "not a PNG" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "input.0.content.0.file_id"


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def _anthropic_image(source: dict) -> dict:
    return {"model": "m", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "source": source}]}]}


def _chat_image(url: str) -> dict:
    return {"model": "m", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


BAD_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10).decode()


@pytest.mark.parametrize("path,body,param,fragment", [
    ("/v1/messages", _anthropic_image({"type": "url", "url": "https://example.com/a.png"}),
     "messages.0.content.1.source", "does not fetch"),
    ("/v1/messages", _anthropic_image({"type": "base64", "media_type": "image/bmp", "data": "AAAA"}),
     "messages.0.content.1.source.media_type", "'image/bmp' is not supported"),
    ("/v1/messages", _anthropic_image({"type": "base64", "media_type": "image/png", "data": BAD_PNG}),
     "messages.0.content.1.source", "does not decode as a image/png"),
    ("/v1/messages", _anthropic_image({"type": "base64", "media_type": "image/png", "data": "%%%"}),
     "messages.0.content.1.source.data", "not valid base64"),
    ("/v1/messages", _anthropic_image({"type": "base64", "media_type": "image/jpeg",
                                       "data": base64.b64encode(IMAGE).decode()}),
     "messages.0.content.1.source", "does not decode as a image/jpeg"),
    ("/v1/chat/completions", _chat_image("https://example.com/a.png"), "messages.0.content.0.image_url.url",
     "does not fetch"),
    ("/v1/chat/completions", _chat_image("data:image/tiff;base64,AAAA"), "messages.0.content.0.image_url.url",
     "'image/tiff' is not supported"),
    ("/v1/chat/completions", _chat_image("data:image/png;base64," + BAD_PNG), "messages.0.content.0.image_url.url",
     "does not decode"),
    ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}]},
     "messages.0.content.0", "only user messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "see <|media_pad|>"}]},
     None, "no images"),
    ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64," + BAD_PNG}]}]},
     "input.0.content.0.image_url", "does not decode"),
    ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}]}, "input.0.content.0.file_id", "no file 'file-1'"),
])
def test_bad_images_are_400_with_their_place(stack, path, body, param, fragment):
    server = stack[0]
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    if path == "/v1/messages":  # Anthropic's error shape has no param: the place is in the message
        assert error["message"].startswith(param)
    elif param is not None:
        assert error["param"] == param
    # nothing was left running
    stats = stack[1].stats()
    assert stats["running"] == 0


def test_text_only_model_answers_images_with_400(scripted):
    png_b64 = base64.b64encode(IMAGE).decode()
    cases = [
        ("/v1/messages", _anthropic_image({"type": "base64", "media_type": "image/png", "data": png_b64}),
         "messages.0.content.1"),
        ("/v1/chat/completions", _chat_image(data_url(IMAGE)), "messages.0.content.0"),
        ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": data_url(IMAGE)}]}]}, "input.0.content.0"),
    ]
    for path, body, param in cases:
        r = httpx.post(scripted.url + path, json=body, headers={"x-api-key": "test-key"}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "no vision" in error["message"]
        assert error.get("param", param) == param and error["message"].startswith(param)
    assert not scripted.engine.calls


def test_metrics_count_the_image_work(stack):
    server, llm, vlm, tok = stack

    def counter(text: str, name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    before = httpx.get(server.url + "/metrics").text
    image = png(30, 22, seed=77)  # an image no other test sends: encoded once, then served from the cache
    for _ in range(2):
        body = {"model": "tiny-vl", "max_tokens": 2, "temperature": 0, "chat_template_kwargs": NO_THINK,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                          {"type": "text", "text": f"call {_}"}]}]}
        assert _post(server, "/v1/chat/completions", body).status_code == 200
    after = httpx.get(server.url + "/metrics").text
    encoded = counter(after, "moonlet_images_encoded_total") - counter(before, "moonlet_images_encoded_total")
    # the second request shares the image's blocks (prefix hit) or its cached features: never a second encode
    assert encoded == 1
    assert counter(after, "moonlet_image_cache_bytes") > 0


def test_model_info_says_whether_images_are_accepted(stack, scripted):
    from moonlet.agent.cli import vision_from_model_info

    server, *_ = stack
    for url, name, vision in ((server.url, "tiny-vl", True), (scripted.url, None, False)):
        listed = httpx.get(url + "/v1/models", headers={"x-api-key": "test-key"}).json()["data"][0]
        name = name or listed["id"]
        for headers in ({"x-api-key": "test-key", "anthropic-version": "2023-06-01"}, {"authorization": "Bearer test-key"}):
            info = httpx.get(f"{url}/v1/models/{name}", headers=headers).json()
            assert info["vision"] is vision and vision_from_model_info(info) is vision


def test_pdf_pages_go_in_as_images_on_a_vision_model(stack, monkeypatch):
    """A PDF part on a vision model: each page's image after its marker, then its text. The reply equals the
    greedy loop over the full multimodal forward with the page rendered by PDFium directly (at the same
    size) and the page layout written out by hand; count_tokens counts the page image's tokens."""
    pypdfium2 = pytest.importorskip("pypdfium2")
    from moonlet.server import documents
    from moonlet.testing import tiny_pdf

    server, llm, vlm, tok = stack
    monkeypatch.setattr(documents, "PAGE_IMAGE_SIDE", 40)  # a 200x100 pt page -> 40x20 px: few image tokens
    data = tiny_pdf(["Hi there"], page_size=(200, 100))
    doc = pypdfium2.PdfDocument(data)
    page_image = doc[0].render(scale=40 / 200).to_pil().convert("RGB")
    doc.close()
    assert page_image.size == (40, 20)
    content = "\n".join(["Document: a.pdf", "--- page 1 ---", IMAGE_PLACEHOLDER, "Hi there", "--- end of document ---"])
    ids = expected_prompt(tok, "Read:\n" + content, [page_image])
    want = reference(vlm, tok, ids, [page_image])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model="tiny-vl", max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
        extra_body={"chat_template_kwargs": NO_THINK},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Read:"}, {"type": "file", "file": {
            "file_data": "data:application/pdf;base64," + base64.b64encode(data).decode(), "filename": "a.pdf"}}]}])
    # 40x20 px in 4-px patches, padded to multiples of 8 px: a 6 x 10 grid -> 3 x 5 = 15 image tokens
    assert r.usage.prompt_tokens == len(ids) and ids.count(vlm.placeholder_id) == 15
    assert [bytes(e.bytes) for e in r.choices[0].logprobs.content][:len(want)] == [tok.decode_bytes([t]) for t in want]
    count = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0).messages.count_tokens(
        model="tiny-vl", thinking={"type": "disabled"}, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Read:"},
            {"type": "document", "title": "a.pdf", "source": {"type": "base64", "media_type": "application/pdf",
                                                             "data": base64.b64encode(data).decode()}}]}])
    # the same PDF as an Anthropic document (a turn's blocks are joined by a blank line there)
    assert count.input_tokens == len(expected_prompt(tok, "Read:\n\n" + content, [page_image]))
