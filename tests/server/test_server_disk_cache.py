"""`moonlet serve --disk-cache-dir`: a restarted server keeps its cached prompts.

Two server processes one after the other over the same directory: the first answers a long chat and is
stopped (SIGTERM: the shutdown finishes the queued writes); the second finds the blocks at start-up,
answers the same chat from a disk hit (its /metrics say so) with the same greedy answer."""

import os
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import free_port

from moonlet.testing import random_model, tiny_k2_config, tiny_tokenizer_dir
from moonlet.weights import save_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    tiny_tokenizer_dir(directory, chat_template="kimi-k2.6")
    save_model(random_model(tiny_k2_config(vocab_size=768, max_position_embeddings=512), seed=2), directory)
    return directory


def serve_once(checkpoint, cache_dir, body: dict) -> tuple[dict, dict, str]:
    """Start `moonlet serve`, send ``body`` to /v1/chat/completions, read /metrics, stop it with SIGTERM.
    Returns (the response, the metric samples, the server's output)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "moonlet", "serve", "--model", str(checkpoint), "--port", str(port),
                             "--num-blocks", "64", "--disk-cache-dir", str(cache_dir), "--disk-cache-size", "64MiB",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        text = httpx.get(url + "/metrics", timeout=10).text
        metrics = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    return reply, metrics, out


@pytest.mark.slow
def test_restarted_server_answers_from_its_disk_cache(checkpoint, tmp_path):
    body = {"model": "m", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "system", "content": "You are a careful agent. " * 20},
                         {"role": "user", "content": "Summarize the plan in one line."}]}
    first, m1, out1 = serve_once(checkpoint, tmp_path, body)
    assert m1["moonlet_disk_cache_hits_total"] == 0 and "disk cache" in out1
    second, m2, out2 = serve_once(checkpoint, tmp_path, body)
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert m2["moonlet_disk_cache_hits_total"] == (prompt_tokens - 1) // 16 * 16 > 0  # every full prompt block
    assert m2["moonlet_prefix_cache_hits_total"] == m2["moonlet_disk_cache_hits_total"]
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert "disk cache" in out2 and " 0 blocks" not in out2.split("disk cache", 1)[1].splitlines()[0]
