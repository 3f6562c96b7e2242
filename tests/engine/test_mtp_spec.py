"""Speculative decoding with DeepSeek-V3's MTP layer (moonlet.model.mtp, moonlet.engine.mtp).

Two things are checked against references that do not use the engine's paged MTP path:
- the output is the target's: greedy output equals the model's own greedy loop
  (moonlet.testing.greedy_reference), seeded sampling equals the engine without speculation;
- the drafts are the MTP layer's: every draft the engine proposes equals the argmax of a plain
  full-sequence computation of the layer (``MTPHead.forward_train`` for the first draft, and the
  same math written out for chained drafts), including after prefix-cache hits, preemption and
  chunked prefill — so the MTP layer's own latent cache holds the right latents everywhere.
And loading: the layers round-trip through a checkpoint (``save_mtp`` / ``load_mtp``), and bad
settings are refused."""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.mtp import MTPProposer
from moonlet.model.mtp import MTPHead
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_kimi_linear_config
from moonlet.weights import load_mtp, save_model, save_mtp

N = 16
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(num_nextn_predict_layers=1), seed=1)


@pytest.fixture(scope="module")
def head(model):
    head = MTPHead(model.config).init_weights(seed=3)
    with torch.no_grad():  # its embedding is a copy of the main model's, as in DeepSeek-V3's checkpoints
        head.layers[0].embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    return head


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 19, 40, 1)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [greedy_reference(model, p, N) for p in prompts]


def mtp_llm(model, head, **kw):
    return LLM(model=model, speculative="mtp", speculative_model=head, **{"num_blocks": 96, **kw})


CONFIGS = {
    "k1": dict(num_speculative_tokens=1),
    "k3": dict(num_speculative_tokens=3),
    "chunked": dict(num_speculative_tokens=2, max_num_batched_tokens=7),
    "preempts": dict(num_speculative_tokens=2, num_blocks=22, block_size=4, max_num_batched_tokens=24),
    "no_prefix_cache": dict(num_speculative_tokens=2, enable_prefix_caching=False),
}


@torch.no_grad()
def reference_drafts(model, head, tokens: list[int], k: int) -> list[int]:
    """The MTP drafts for a sequence whose known tokens are ``tokens``, computed in one plain pass:
    first draft from (target hidden at n-2, token n-1); each further one from (the layer's own output
    at the previous position, the previous draft)."""
    layer = head.layers[0]
    ids = torch.tensor([tokens])
    hidden = model.hidden_states(ids)[0]  # [n, H]; positions 0..n-2 are the ones used
    n = len(tokens)
    hs = [hidden[i] for i in range(n - 1)]
    nxt = list(tokens[1:])
    drafts = []
    for j in range(k):
        T = len(nxt)
        x = layer.combine(model.model.embed_tokens(torch.tensor(nxt)), torch.stack(hs))[None]  # the main model's
        cos, sin = model.model.rotary_emb(torch.arange(T)[None])
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None]
        y = layer(x, cos, sin, mask=mask)[0]
        drafts.append(int(layer.logits(y[-1]).argmax()))
        hs.append(y[-1])
        nxt.append(drafts[-1])
    return drafts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_is_the_targets_and_drafts_are_the_mtp_layers(model, head, prompts, expected, name):
    llm = mtp_llm(model, head, **CONFIGS[name])
    k = CONFIGS[name]["num_speculative_tokens"]
    proposer = llm.engine.proposer
    assert isinstance(proposer, MTPProposer)
    seen = []
    observe = proposer.observe

    def recording(seqs, target):
        observe(seqs, target)
        for seq in seqs:
            if seq.mtp_drafts is not None and seq.mtp_drafts[0] == seq.num_tokens and seq.finish_reason is None:
                seen.append((list(seq.token_ids), list(seq.mtp_drafts[1])))

    proposer.observe = recording
    for _ in range(2):  # the second round starts from prefix-cache hits
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["blocks_free"] == stats["blocks_total"]
    if name == "preempts":
        assert stats["preemptions"] > 0
    assert len(seen) > 20
    for tokens, drafts in seen[::3]:
        assert drafts == reference_drafts(model, head, tokens, len(drafts))[:len(drafts)], (name, len(tokens))
    assert max(len(d) for _, d in seen) == k


def test_first_drafts_match_forward_train(model, head, prompts):
    """``forward_train`` (the training path) and the chained reference agree on the first draft."""
    tokens = prompts[2]
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = head.forward_train(model.model.rotary_emb, model.hidden_states(ids), ids)
    assert int(logits[0, -1].argmax()) == reference_drafts(model, head, tokens, 1)[0]


def test_seeded_sampling_equals_no_speculation(model, head, prompts):
    params = [SamplingParams(temperature=0.8, max_tokens=N, seed=7 + i, ignore_eos=True, logprobs=1)
              for i in range(len(prompts))]
    plain = LLM(model=model, num_blocks=96).generate(prompts, params)
    spec = mtp_llm(model, head, num_speculative_tokens=2).generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


def test_checkpoint_round_trip_and_refusals(model, head, tmp_path):
    save_model(model, tmp_path / "ck")
    save_mtp(head, model, tmp_path / "ck")
    loaded = load_mtp(tmp_path / "ck", dtype=torch.float32)
    for (a, x), (b, y) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert a == b and torch.equal(x, y)
    llm = LLM(str(tmp_path / "ck"), dtype="float32", num_blocks=64, speculative="mtp", num_speculative_tokens=2)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    assert llm.generate([prompt], GREEDY)[0].token_ids == greedy_reference(model, prompt, N)
    assert llm.stats()["spec_draft_tokens"] > 0
    plain_dir = tmp_path / "plain"
    save_model(random_model(tiny_k2_config(), seed=1), plain_dir)
    with pytest.raises(ValueError, match="no multi-token-prediction layers"):
        LLM(str(plain_dir), num_blocks=16, speculative="mtp")
    with pytest.raises(ValueError, match="host_cache_memory"):
        LLM(str(tmp_path / "ck"), num_blocks=16, speculative="mtp", host_cache_memory="1MiB")
    hybrid = random_model(tiny_kimi_linear_config())
    with pytest.raises(ValueError, match="no MTP layers"):
        LLM(model=hybrid, num_blocks=16, speculative="mtp", speculative_model=head)
    with pytest.raises(ValueError, match="loads the MTP layer from the checkpoint"):
        LLM(model=model, num_blocks=16, speculative="mtp")
    with pytest.raises(ValueError, match="decode_graphs='eager' cannot be used with speculative='mtp'"):
        LLM(model=model, num_blocks=16, speculative="mtp", speculative_model=head, decode_graphs="eager")
