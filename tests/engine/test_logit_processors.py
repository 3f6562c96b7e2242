"""Logit processors (logit_bias, min_tokens, bad_words, allowed_token_ids) against greedy loops over
the model's full forward that edit the logits by hand, and the batched edits against per-row ones."""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.processors import LogitProcessors, apply_processors
from moonlet.engine.sequence import Sequence
from moonlet.testing import random_model, tiny_k2_config, tiny_tokenizer_dir
from moonlet.tokenizer import IncrementalDetokenizer, Tokenizer

EOS = 1  # tiny_k2_config's eos_token_id


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(tiny_k2_config(vocab_size=tokenizer.vocab_size), seed=11)


@pytest.fixture(scope="module")
def llm(model, tokenizer):
    return LLM(model=model, tokenizer=tokenizer, num_blocks=96)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer.encode("Beautiful is better than ugly. Explicit is better than")


def greedy_by_hand(model, prompt, n, edit=None, stop_ids=()):
    """Greedy decoding with no cache; ``edit(logits, output so far)`` changes the raw logits first.
    Stops after a token in ``stop_ids`` (kept, as the engine keeps it)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([ids]))[0, -1].float().clone()
            if edit is not None:
                row = edit(row, out)
            t = int(row.argmax())
            out.append(t)
            ids.append(t)
            if t in stop_ids:
                break
    return out


def generate(llm, prompt, **fields):
    return llm.generate([prompt], SamplingParams(temperature=0, **fields))[0]


def test_logit_bias_forces_and_shifts_greedy_tokens(llm, model, prompt):
    plain = generate(llm, prompt, max_tokens=8, ignore_eos=True).token_ids
    forced = next(t for t in range(5, 300) if t not in plain)
    out = generate(llm, prompt, max_tokens=8, ignore_eos=True, logit_bias={forced: 100})
    assert out.token_ids == [forced] * 8 != plain
    # a mild bias on several tokens: the greedy loop that adds it by hand
    bias = {plain[0]: -2.5, plain[1]: 1.5, forced: 3.0, 7: -100}
    ref = greedy_by_hand(model, prompt, 8, lambda row, _: row + torch.zeros_like(row).index_put_(
        (torch.tensor(list(bias)),), torch.tensor(list(bias.values()))))
    out = generate(llm, prompt, max_tokens=8, ignore_eos=True, logit_bias={str(k): v for k, v in bias.items()},
                   logprobs=2)
    assert out.token_ids == ref != plain
    # logprobs stay the raw model distribution: the unbiased run's values for the same prefix
    raw = generate(llm, prompt, max_tokens=1, ignore_eos=True, logprobs=2).logprobs[0]
    assert {k: v for k, v in out.logprobs[0].items() if k in raw} == pytest.approx(raw, abs=1e-5)


def test_min_tokens_holds_back_eos_and_stop_tokens(llm, model, prompt):
    # a bias toward EOS makes it come at once; min_tokens=5 masks it for five tokens
    early = generate(llm, prompt, max_tokens=10, logit_bias={EOS: 30})
    assert early.token_ids == [EOS] and early.finish_reason == "stop"

    def masked_until(n, stop):
        def edit(row, out):
            row[EOS] += 30
            if len(out) < n:
                row[list(stop)] = float("-inf")
            return row
        return edit

    out = generate(llm, prompt, max_tokens=10, logit_bias={EOS: 30}, min_tokens=5)
    ref = greedy_by_hand(model, prompt, 10, masked_until(5, llm.engine.eos_ids), stop_ids=llm.engine.eos_ids)
    assert out.token_ids == ref and len(ref) == 6 and ref[-1] == EOS and out.finish_reason == "stop"
    assert EOS not in out.token_ids[:5]
    # stop_token_ids on a token greedy decoding produces early
    plain = generate(llm, prompt, max_tokens=12, ignore_eos=True).token_ids
    stop = plain[1]
    cut = generate(llm, prompt, max_tokens=12, ignore_eos=True, stop_token_ids=[stop])
    assert cut.token_ids == plain[:plain.index(stop) + 1]
    out = generate(llm, prompt, max_tokens=12, ignore_eos=True, stop_token_ids=[stop], min_tokens=6)

    def edit(row, so_far):
        if len(so_far) < 6:
            row[stop] = float("-inf")
        return row

    assert out.token_ids == greedy_by_hand(model, prompt, 12, edit, stop_ids={stop})
    assert stop not in out.token_ids[:6] and len(out.token_ids) >= 6


def test_min_tokens_ignores_stop_strings_until_then(tokenizer):
    ids = tokenizer.encode("ab ab ab ab ab ab")

    def final(**fields):
        seq = Sequence("r", [1], SamplingParams(stop=["ab"], **fields), frozenset(),
                       IncrementalDetokenizer(tokenizer))
        for t in ids:
            seq.append_token(t, max_model_len=10_000)
            if seq.finish_reason:
                break
        return seq.make_output()

    assert final().text == ""  # the first "ab" stops it
    out = final(min_tokens=3)
    # the first stop string whose last token comes at or after the third token ends it
    ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
    k = next(i for i in range(2, len(ids)) if "ab" in tokenizer.decode(ids[:i + 1])[max(0, ends[i - 1] - 1):])
    text = tokenizer.decode(ids[:k + 1])
    assert out.finish_reason == "stop" and len(out.token_ids) == k + 1 >= 3
    assert out.text == text[:text.index("ab", max(0, ends[k - 1] - 1))]


def test_bad_words_never_appear(llm, model, tokenizer, prompt):
    plain = generate(llm, prompt, max_tokens=16, ignore_eos=True).token_ids
    # a word of two tokens that the unbanned output contains (and that encodes back to them)
    word = next(w for i in range(len(plain) - 1)
                for w in [tokenizer.decode(plain[i:i + 2])]
                if w.strip() and tokenizer.encode(w, allow_special=False) == plain[i:i + 2])
    banned = {tuple(tokenizer.encode(text, allow_special=False)) for text in (word, " " + word.lstrip())}

    def contains(seq, sub):
        return any(tuple(seq[i:i + len(sub)]) == sub for i in range(len(seq) - len(sub) + 1))

    assert any(contains(plain, b) for b in banned)
    out = generate(llm, prompt, max_tokens=16, ignore_eos=True, bad_words=[word])
    assert not any(contains(out.token_ids, b) for b in banned)

    def edit(row, so_far):
        for b in banned:
            if len(b) == 1 or tuple(so_far[-(len(b) - 1):]) == b[:-1]:
                row[b[-1]] = float("-inf")
        return row

    assert out.token_ids == greedy_by_hand(model, prompt, 16, edit)


def test_allowed_token_ids(llm, model, prompt):
    allowed = [3, 17, 40, 41, 99, 250]
    out = generate(llm, prompt, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed)

    def edit(row, _):
        keep = torch.full_like(row, float("-inf"))
        keep[allowed] = row[allowed]
        return keep

    assert out.token_ids == greedy_by_hand(model, prompt, 8, edit)
    sampled = llm.generate([prompt], SamplingParams(temperature=1.5, seed=3, max_tokens=30, ignore_eos=True,
                                                    allowed_token_ids=allowed))[0]
    assert set(sampled.token_ids) <= set(allowed) and len(set(sampled.token_ids)) > 1


def test_speculative_decoding_gives_the_same_tokens(model, tokenizer, prompt):
    fields = [dict(logit_bias={EOS: 30}, min_tokens=7, max_tokens=12), dict(allowed_token_ids=[3, 17, 40, 41]),
              dict(bad_words=["is", " than"], max_tokens=14, ignore_eos=True)]
    params = [SamplingParams(temperature=0, **{"max_tokens": 10, **f}) for f in fields]
    plain = LLM(model=model, tokenizer=tokenizer, num_blocks=96).generate([prompt] * 3, params)
    spec = LLM(model=model, tokenizer=tokenizer, num_blocks=96, speculative="ngram",
               ngram_min=1).generate([prompt] * 3, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


def test_batched_edits_equal_per_row_edits():
    g = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(4, V, generator=g)
    rows = [
        (0, SamplingParams(logit_bias={3: 2.0, 7: -1.5}, min_tokens=2), [5], {1, 9}, []),
        (1, SamplingParams(allowed_token_ids=[4, 8, 9]), [], set(), [(8,), (2, 9)]),
        (3, SamplingParams(bad_words=["x"], logit_bias={10: 1.0}), [1, 2], set(), [(2, 9), (2, 11), (1, 2, 12)]),
    ]
    entries = [(r, LogitProcessors(p, stop, words, "cpu"), hist) for r, p, hist, stop, words in rows]
    got = apply_processors(logits.clone(), entries)
    want = logits.clone()
    want[0, 3] += 2.0
    want[0, 7] -= 1.5
    want[0, [1, 9]] = float("-inf")  # 1 token generated < min_tokens 2
    keep = want[1, [4, 9]].clone()  # allowed 4, 8, 9; 8 is a one-token bad word
    want[1] = float("-inf")
    want[1, [4, 9]] = keep
    want[3, 10] += 1.0
    want[3, [9, 11, 12]] = float("-inf")  # the output ends with 2 (and with 1, 2)
    assert torch.equal(got, want)


def test_bad_values_are_clear_errors(llm):
    for fields, name in ((dict(logit_bias={5: 101}), "logit_bias"), (dict(logit_bias={"x": 1}), "logit_bias"),
                         (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
                         (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(bad_words=[" "]), "bad_words"),
                         (dict(structured={"regex": "a+"}, min_tokens=2), "min_tokens"),
                         (dict(structured={"regex": "a+"}, allowed_token_ids=[3]), "allowed_token_ids")):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**fields)
    for fields, name in ((dict(logit_bias={10**6: 1}), "logit_bias"), (dict(allowed_token_ids=[3, 10**6]),
                                                                     "allowed_token_ids")):
        with pytest.raises(ValueError, match=f"{name}: token id 1000000 is outside"):
            llm.generate([[5, 6]], SamplingParams(**fields))
    bare = LLM(model=llm.engine.model, num_blocks=8)
    with pytest.raises(ValueError, match="bad_words need a tokenizer"):
        bare.generate([[5, 6]], SamplingParams(bad_words=["x"]))


def _no_repeat_of_last(out_ids, row):
    """A user processor: never the token just generated (edits the row in place)."""
    if out_ids:
        row[out_ids[-1]] = float("-inf")
    return row


def test_user_logits_processors_equal_a_hand_edited_greedy_loop(llm, model, prompt):
    def favor_odd(out_ids, row):  # returns a new tensor; runs after the built-in edits and the first callable
        return row + (torch.arange(row.shape[0]) % 2) * 0.75

    def edit(row, out):
        row[7] = float("-inf")  # logit_bias -100 on token 7, then the two callables in order
        row = _no_repeat_of_last(out, row)
        return favor_odd(out, row)

    ref = greedy_by_hand(model, prompt, 10, edit)
    out = generate(llm, prompt, max_tokens=10, ignore_eos=True, logit_bias={7: -100},
                   logits_processors=[_no_repeat_of_last, favor_odd])
    plain = generate(llm, prompt, max_tokens=10, ignore_eos=True).token_ids
    assert out.token_ids == ref != plain
    assert all(a != b for a, b in zip(out.token_ids, out.token_ids[1:]))


def test_a_failing_user_processor_aborts_only_its_request(llm, model, prompt):
    calls = []

    def breaks_on_third(out_ids, row):
        calls.append(len(out_ids))
        if len(out_ids) == 2:
            raise RuntimeError("boom")
        return row

    def wrong_shape(out_ids, row):
        return row[:10]

    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logits_processors=[breaks_on_third]),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logits_processors=[wrong_shape]),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    outs = llm.generate([prompt] * 3, params)
    ref = greedy_by_hand(model, prompt, 6)
    assert outs[0].finish_reason == "abort" and outs[0].token_ids == ref[:3] and calls == [0, 1, 2]
    assert outs[1].finish_reason == "abort" and len(outs[1].token_ids) == 1
    assert outs[2].finish_reason == "length" and outs[2].token_ids == ref  # the batch went on
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=["not callable"])
