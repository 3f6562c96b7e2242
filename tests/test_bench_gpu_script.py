"""bench/gpu_moonlight.py: the issue-6 measurement script, on CPU.

A smoke run in a subprocess with a tiny shape (every table row for both systems, numbers positive
and finite, both checks passing), and its pieces against independent references: the bytes a
batch-1 decode step reads against ModelConfig.param_counts() and against the tensors of a model,
the weight mapping into transformers against transformers' own checkpoint loading, and the two
check verdicts on hand-built logits.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moonlet.config import preset
from moonlet.testing import random_model, tiny_k2_config, tiny_v2_lite_config

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_moonlight.py"


@pytest.fixture(scope="module")
def gm():
    spec = importlib.util.spec_from_file_location("gpu_moonlight", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = {
    "moonlight-16b-a3b": lambda: preset("moonlight-16b-a3b"),
    "kimi-k2": lambda: preset("kimi-k2"),
    "deepseek-v2-lite": lambda: preset("deepseek-v2-lite"),  # softmax greedy router: no correction bias
    "tiny-k2": tiny_k2_config,
    "tiny-k2-tied": lambda: tiny_k2_config(tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_weight_params_are_the_active_count_with_one_embedding_row(gm, name):
    """param_counts()['active'] counts what one token uses as parameters: the whole embedding
    table among them. A decode step reads only the token's row of that table; everything else
    active (attention, norms, dense MLPs, router + its bias, shared and top-k experts, lm_head)
    it reads whole. So touched = active - vocab*hidden + hidden. With tied embeddings the table is
    the lm_head, counted once in both, and the row lies inside it: touched = active."""
    config = CONFIGS[name]()
    active = config.param_counts()["active"]
    touched = gm.decode_weight_bytes(config)["params"]
    if config.tie_word_embeddings:
        assert touched == active
    else:
        assert touched == active - config.vocab_size * config.hidden_size + config.hidden_size


@pytest.mark.parametrize("make", [tiny_k2_config, tiny_v2_lite_config, lambda: tiny_k2_config(n_shared_experts=0)])
def test_decode_weight_bytes_are_the_tensors_a_step_reads(gm, make):
    """Re-derived from a bf16 model's own tensors: one embedding row, every tensor of the layers
    except the routed experts, num_experts_per_tok routed experts per MoE layer (all equal in
    size), the final norm and the lm_head; the router correction bias stays float32."""
    config = make()
    model = random_model(config).cast(torch.bfloat16)
    k = config.num_experts_per_tok
    want_bytes = want_params = 0

    def add(t: torch.Tensor) -> None:
        nonlocal want_bytes, want_params
        want_bytes += t.numel() * t.element_size()
        want_params += t.numel()

    add(model.model.embed_tokens.weight[0])
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    for name, t in tensors:
        if name == "model.embed_tokens.weight":
            continue
        if ".mlp.experts." in name:
            if int(name.split(".mlp.experts.")[1].split(".")[0]) < k:
                add(t)
            continue
        add(t)
    assert any(t.dtype == torch.float32 for _, t in tensors) == (config.topk_method == "noaux_tc")
    got = gm.decode_weight_bytes(config, torch.bfloat16)
    assert got == {"params": want_params, "bytes": want_bytes}


def test_transformers_gets_the_same_weights_as_from_pretrained(gm, tmp_path):
    """The in-memory mapping (stacked experts) gives exactly the model transformers itself loads
    from moonlet's checkpoint files, and both systems compute the same logits in float32."""
    transformers = pytest.importorskip("transformers")
    from moonlet.weights import save_model

    config = tiny_k2_config(model_type="deepseek_v3")
    cpu = torch.device("cpu")
    ours = gm.build_moonlet(config, cpu, torch.float32, seed=5)
    save_model(ours, tmp_path)
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    built = gm.build_transformers(config, cpu, torch.float32, seed=5)
    want, got = loaded.state_dict(), built.state_dict()
    assert set(want) == set(got)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert gm.relative_error(ours(ids), built(ids).logits) < 1e-5


def test_random_weights_depend_on_name_and_seed_only(gm):
    a = gm.random_tensor("model.layers.3.mlp.experts.7.up_proj.weight", (4, 5), 0, "cpu", 0.02)
    assert torch.equal(a, gm.random_tensor("model.layers.3.mlp.experts.7.up_proj.weight", (4, 5), 0, "cpu", 0.02))
    assert not torch.equal(a, gm.random_tensor("model.layers.3.mlp.experts.7.up_proj.weight", (4, 5), 1, "cpu", 0.02))
    assert not torch.equal(a, gm.random_tensor("model.layers.3.mlp.experts.6.up_proj.weight", (4, 5), 0, "cpu", 0.02))
    norm = gm.random_tensor("model.layers.0.input_layernorm.weight", (4096,), 0, "cpu", 0.02)
    assert abs(norm.mean().item() - 1) < 0.01 and abs(norm.std().item() - 0.1) < 0.01


def test_logits_verdicts(gm):
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(1, 20, 50, generator=g)
    noise = lambda scale: truth + scale * torch.randn(truth.shape, generator=g)  # noqa: E731
    theirs = noise(0.01)
    ours = noise(0.01)
    c = gm.logits_agreement(ours, theirs, torch.bfloat16, truth)
    assert c["ok"] and c["moonlet_vs_fp32"] == pytest.approx(0.01, rel=0.3)
    flipped = ours.clone()
    flipped[0, :3] = torch.randn(3, 50, generator=g)  # three routing flips: far off at those positions
    assert gm.logits_agreement(flipped, theirs, torch.bfloat16, truth)["ok"]
    assert not gm.logits_agreement(noise(0.05), theirs, torch.bfloat16, truth)["ok"]
    assert not gm.logits_agreement(torch.randn(truth.shape, generator=g), theirs, torch.bfloat16, truth)["ok"]
    assert gm.logits_agreement(truth + 1e-6, truth, torch.float32)["ok"]
    assert not gm.logits_agreement(truth + 1e-2, truth, torch.float32)["ok"]


def test_greedy_verdicts(gm):
    ref = torch.zeros(3, 6)
    ref[0, 2] = 5.0  # clear winner 2
    ref[1, 4], ref[1, 1] = 3.0, 2.99  # near-tie between 4 and 1
    ref[2, 0], ref[2, 5] = 4.0, 1.0  # clear winner 0
    dev = ref + 0.02  # the device's logits: off by 0.02 everywhere
    ok = gm.judge_greedy([2, 1, 0], ref, dev)
    assert ok["agree"] == 2 and ok["near_ties"] == 1 and ok["failed_steps"] == []
    bad = gm.judge_greedy([2, 4, 5], ref, dev)  # step 2 picks a token 3 logits below the winner
    assert bad["agree"] == 2 and bad["failed_steps"] == [2]
    exact = gm.judge_greedy([2, 4, 0], ref, ref)
    assert exact["agree"] == 3 and exact["rms_logit_noise"] == 0
    assert gm.judge_greedy([2, 1, 0], ref, ref)["failed_steps"] == [1]  # no rounding: no near-tie either


SMOKE = ["--preset", "tiny-k2", "--device", "cpu", "--prefill-len", "48", "--batches", "1,3", "--prompt-len", "8",
         "--decode-steps", "4", "--warmup", "1", "--repeats", "1", "--check-prompt-len", "12", "--check-tokens", "8"]


def _numbers(cells: list[str]) -> list[float]:
    return [float(c.replace(",", "")) for c in cells]


def test_smoke_run_on_cpu(tmp_path):
    """The whole script on a tiny shape: every row for both systems, positive finite numbers, checks ok."""
    pytest.importorskip("transformers")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMOKE, "--json", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())

    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["torch"] == torch.__version__
    assert r["transformers_version"] and r["date"] and "--preset tiny-k2" in r["command"]
    for system in ("moonlet", "transformers"):
        part = r[system]
        values = [part["prefill_tok_s"], part["kv_bytes_per_token"], part["peak_memory_bytes"]]
        assert sorted(part["decode_ms_per_step"]) == ["1", "3"]
        values += part["decode_ms_per_step"].values()
        assert all(math.isfinite(v) and v > 0 for v in values), (system, part)
    config = tiny_k2_config()
    # both cache the latent and the rotated key per layer, float32
    latent = config.num_hidden_layers * config.latent_dim * 4
    assert r["moonlet"]["kv_bytes_per_token"] == latent
    assert r["transformers"]["kv_bytes_per_token"] == latent
    assert r["bandwidth_bytes_s"] > 0 and r["floor_ms"] > 0 and math.isfinite(r["floor_ms"])
    assert r["weights_touched"] == {"params": config.param_counts()["active"] - config.vocab_size * config.hidden_size
                                    + config.hidden_size,
                                    "bytes": 4 * r["weights_touched"]["params"]}
    assert r["checks"]["logits"]["ok"] and r["checks"]["logits"]["median_error"] < 1e-4
    greedy = r["checks"]["greedy"]
    assert greedy["ok"] and greedy["equal"] and greedy["device_tokens"] == greedy["reference_tokens"]
    assert len(greedy["device_tokens"]) == 8 and greedy["agree"] == 8

    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] != "metric":
            rows[cells[0]] = cells[1:]
    expected = ["prefill tokens/s @ 48", "decode ms/step @ batch 1", "decode tokens/s @ batch 1",
                "decode ms/step @ batch 3", "decode tokens/s @ batch 3", "KV-cache bytes/token", "peak memory GiB",
                "batch-1 decode floor ms"]
    assert list(rows) == expected
    for name in expected:
        assert all(v > 0 and math.isfinite(v) for v in _numbers(rows[name])), (name, rows[name])
    assert "check logits" in proc.stdout and "check greedy tokens" in proc.stdout and "FAILED" not in proc.stdout
