"""Multi-LoRA over HTTP: the OpenAI and Anthropic SDKs select an adapter by model name, /v1/models lists
the adapters with their parent, unknown names are 404, the runtime load / unload routes (only with
allow_runtime_lora) and the per-adapter request counter. Outputs are checked against each adapter merged
into the model and run directly (full forward passes, no cache)."""

import copy

import anthropic
import httpx
import openai
import pytest
import torch
from server_support import LiveServer

from moonlet.engine import AsyncLLM
from moonlet.model.lora import merge_adapter
from moonlet.server import create_app
from moonlet.testing import random_adapter, random_model, tiny_k2_config
from moonlet.tokenizer import Tokenizer

MAX_LEN = 384


@pytest.fixture(scope="module")
def stack(tokenizer_dir, tmp_path_factory):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size, max_position_embeddings=MAX_LEN), seed=11)
    root = tmp_path_factory.mktemp("loras")
    paths = {"sql": random_adapter(model, root / "sql", r=4, seed=21, std=0.4),
             "poet": random_adapter(model, root / "poet", r=8, seed=22, std=0.4)}
    merged = {None: model, **{k: merge_adapter(copy.deepcopy(model), p).eval() for k, p in paths.items()}}
    llm = AsyncLLM(model=model, tokenizer=tok, num_blocks=96, block_size=16, start=False,
                   lora_modules={"sql": str(paths["sql"])}, max_loras=2)
    app = create_app(llm, served_model_name="tiny", shutdown_engine_on_exit=True, allow_runtime_lora=True)
    with LiveServer(app) as server:
        yield server, llm, merged, tok, paths


def reference_greedy(model, prompt, n, stop_ids):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt in stop_ids:
                break
            ids.append(nxt)
    return ids[len(prompt):]


def test_openai_selects_the_adapter_by_model_name(stack):
    server, llm, merged, tok, paths = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    prompt = tok.encode("The weather today")
    stops = set(tok.stop_token_ids) | {1}
    texts = {}
    for model, lora in (("tiny", None), ("sql", "sql")):
        r = client.completions.create(model=model, prompt="The weather today", max_tokens=12, temperature=0)
        assert r.model == model
        texts[model] = r.choices[0].text
        assert texts[model] == tok.decode(reference_greedy(merged[lora], prompt, 12, stops))
    assert texts["tiny"] != texts["sql"]
    with pytest.raises(openai.NotFoundError, match="model 'nope' not found; this server serves 'tiny', 'sql'"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    chat = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.model == "sql" and chat.choices[0].message is not None


def test_models_list_adapters_with_parent(stack):
    server, llm, merged, tok, paths = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) >= {"tiny", "sql"}
    assert cards["sql"].parent == "tiny" and cards["sql"].root == str(paths["sql"])
    assert getattr(cards["tiny"], "parent", None) is None
    assert client.models.retrieve("sql").parent == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_anthropic_selects_the_adapter(stack):
    server, llm, merged, tok, paths = stack
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    kwargs = dict(max_tokens=8, thinking={"type": "disabled"}, extra_body={"temperature": 0},
                  messages=[{"role": "user", "content": "Name a fox."}])
    base = client.messages.create(model="tiny", **kwargs)
    sql = client.messages.create(model="sql", **kwargs)
    assert sql.model == "sql" and sql.content != base.content
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", **kwargs)


def test_runtime_load_and_unload(stack):
    server, llm, merged, tok, paths = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "poet", "lora_path": str(paths["poet"])})
        assert r.status_code == 200 and "poet" in r.text
        assert "poet" in {m.id for m in client.models.list().data}
        prompt = tok.encode("Once upon")
        r = client.completions.create(model="poet", prompt="Once upon", max_tokens=10, temperature=0)
        assert r.choices[0].text == tok.decode(reference_greedy(merged["poet"], prompt, 10,
                                                                set(tok.stop_token_ids) | {1}))
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "poet", "lora_path": str(paths["poet"])})
        assert again.status_code == 400 and "already registered" in again.text
        bad = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/no/such/dir"})
        assert bad.status_code == 400 and "adapter_config.json" in bad.text
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "poet"}).status_code == 200
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "poet"}).status_code == 404
        metrics = http.get("/metrics").text
    assert 'moonlet_lora_requests_total{adapter="sql"}' in metrics
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="poet", prompt="x", max_tokens=2)


def test_runtime_routes_are_off_by_default_and_names_are_free_without_lora(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size, max_position_embeddings=MAX_LEN), seed=11)
    llm = AsyncLLM(model=model, tokenizer=tok, num_blocks=32, block_size=16, start=False)
    app = create_app(llm, served_model_name="tiny", shutdown_engine_on_exit=True)
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}).status_code == 404
        # without adapters any model name is served by the one model, as before
        r = http.post("/v1/completions", json={"model": "whatever", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
