"""Turns a batch of next-token logits into tokens, each row under its own request's SamplingParams.

Order of operations per row: (raw log-probabilities for ``logprobs``) → logit processors (logit
bias, allowed tokens, bad words, min_tokens; ``processors``) → repetition penalty →
presence/frequency penalties → greedy argmax if temperature is 0, else temperature → top-k → top-p
→ min-p → sample. Sampling uses the exponential race (argmax of p / Exp(1) noise), which draws
exactly one noise vector per row per step; a request with a seed draws it from its own generator,
so its samples do not depend on the rest of the batch.

Rows of requests whose thinking budget is spent (``Sequence.thinking``, see ``thinking``) get the
closing marker's next token in place of the sampled one, after sampling and on the host: the
forward, the noise draws and every other row are exactly as without the budget.

Rows of requests with a structured-output constraint (``Sequence.structured``, see ``structured``)
have the logits their grammar forbids set to -inf after the penalties, so every later stage —
greedy argmax, temperature, the filters, the draw — only sees allowed tokens. Raw logprobs are
taken before the mask (the model's distribution).

Speculative decoding (``Sampler.verify``): a sequence with draft tokens has one row per position;
each row is processed as above (its penalties also counting the drafts before it), and the drafts
are kept while they equal the row's target token — see ``verify`` for why that is exact.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Sequence as Seq

import torch

from .params import SamplingParams
from .processors import apply_processors


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    params: list[SamplingParams]) -> torch.Tensor:
    """logits [S, V]; returns penalized logits (new tensor).

    repetition_penalty r (tokens seen in prompt or output): logit > 0 → logit / r, else logit · r.
    presence p and frequency f (tokens seen in the output, c = count): logit − f·c − p·[c > 0].
    """
    S, V = logits.shape
    device = logits.device
    out = logits.clone()
    rep = torch.tensor([p.repetition_penalty for p in params], device=device, dtype=logits.dtype)
    pres = torch.tensor([p.presence_penalty for p in params], device=device, dtype=logits.dtype)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device, dtype=logits.dtype)
    counts = _token_counts(output_ids, V, device, logits.dtype)  # [S, V]
    if bool((rep != 1).any()):
        seen = _token_counts(prompt_ids, V, device, logits.dtype) + counts > 0
        r = rep[:, None].expand(S, V)
        penalized = torch.where(out > 0, out / r, out * r)
        out = torch.where(seen, penalized, out)
    out = out - freq[:, None] * counts - pres[:, None] * (counts > 0).to(logits.dtype)
    return out


def _token_counts(rows: list[list[int]], vocab: int, device, dtype) -> torch.Tensor:
    counts = torch.zeros(len(rows), vocab, device=device, dtype=dtype)
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return counts
    ids = torch.full((len(rows), width), vocab, dtype=torch.long)  # pad with an out-of-vocab column
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    padded = torch.zeros(len(rows), vocab + 1, device=device, dtype=dtype)
    padded.scatter_add_(1, ids.to(device), torch.ones(ids.shape, device=device, dtype=dtype))
    return padded[:, :vocab]


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, then min-p remove. logits [S, V] (already tempered);
    top_k [S] (<= 0 or >= V: off), top_p [S] (1: off), min_p [S] (0: off).

    top-k keeps the k highest logits (ties at the boundary broken by sort order); top-p keeps the
    smallest set of most likely tokens whose probability reaches top_p; min-p drops tokens whose
    probability is below min_p times the most likely token's.
    """
    S, V = logits.shape
    out = logits
    need_sort = bool(((top_k > 0) & (top_k < V)).any()) or bool((top_p < 1).any())
    if need_sort:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=out.device)[None]
        k = torch.where(top_k > 0, top_k, V).clamp(max=V)
        sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop = (before >= top_p[:, None]) & (rank > 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        out = torch.full_like(out, float("-inf")).scatter(1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = out.softmax(dim=-1)
        threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        out = out.masked_fill(probs < threshold, float("-inf"))
    return out


class SampleResult(NamedTuple):
    """What one sequence gets from a step: ``tokens`` to append in order (one, or with speculative
    drafts the accepted drafts and then the target's token), a logprobs dict or None per token, and
    how many of the tokens are accepted drafts (``len(tokens) - 1``)."""

    tokens: list[int]
    logprobs: list[dict[int, float] | None]
    num_accepted: int


class Sampler:
    """Samples one token per row. ``seed`` seeds the generator shared by requests without their own."""

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: Seq) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [S, V] for ``seqs`` (objects with .params, .prompt_token_ids, .output_token_ids,
        .token_ids, .generator, .thinking for rows with a thinking budget and .processors for rows
        with logit processors). Returns the sampled
        token ids (the forced ones for spent thinking budgets) and, per row, a logprobs dict or None."""
        results = self.verify(logits, seqs)
        return [r.tokens[0] for r in results], [r.logprobs[0] for r in results]

    @torch.no_grad()
    def verify(self, logits: torch.Tensor, seqs: Seq, drafts: Seq[Seq[int]] | None = None) -> list[SampleResult]:
        """Sample each sequence's next token(s), verifying its speculative drafts.

        ``drafts[i]`` (default: none) are sequence i's draft tokens; ``logits`` holds ``1 + len(drafts[i])``
        consecutive rows for it: row j is the distribution after its tokens and its first j drafts.
        Every row is processed as its own step would be without speculation — penalties over the
        output plus the drafts before it, temperature, filters, one noise draw, the thinking budget's
        forced token — which gives the target token t_j of that position. The sequence keeps drafts
        while ``draft j == t_j`` and then emits the first t_j that differs (or t_k after the last
        draft). Since t_j ~ p_j, a draft d is accepted with probability p_j(d) and a rejection emits
        p_j with d removed and renormalized: exactly the target distribution, and for greedy rows
        exactly the tokens of decoding without drafts.

        Seeded requests: each row draws its noise from the request's generator in order, and the
        generator is rewound to just after the last row used, so a seeded request consumes one
        draw per emitted token, as without speculation.
        """
        logits = logits.float()
        R, V = logits.shape
        if drafts is None:
            drafts = [()] * len(seqs)
        owners: list = []  # the sequence of each row
        which: list[int] = []  # ... and its index in seqs
        offsets: list[int] = []  # row j of a sequence sees its first j drafts
        for k, (s, d) in enumerate(zip(seqs, drafts)):
            owners.extend([s] * (1 + len(d)))
            which.extend([k] * (1 + len(d)))
            offsets.extend(range(1 + len(d)))
        if len(owners) != R:
            raise ValueError(f"{R} logit rows for {len(seqs)} sequences that need {len(owners)} (1 + drafts each)")
        params = [s.params for s in owners]
        want_lp = [p.logprobs is not None for p in params]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_lp) else None

        owned = False  # whether ``logits`` is our own copy (the runner's tensor is never changed)
        proc_rows = [(i, owners[i].processors, owners[i].output_token_ids + list(drafts[which[i]][:offsets[i]]))
                     for i in range(R) if getattr(owners[i], "processors", None) is not None]
        if proc_rows:
            logits, owned = apply_processors(logits.clone(), proc_rows), True
        pen_rows = [i for i, p in enumerate(params) if p.needs_penalties]
        if pen_rows:
            idx = torch.tensor(pen_rows, device=logits.device)
            if not owned:
                logits, owned = logits.clone(), True
            outputs = [owners[i].output_token_ids + list(drafts[which[i]][:offsets[i]]) for i in pen_rows]
            logits[idx] = apply_penalties(logits[idx], [owners[i].prompt_token_ids for i in pen_rows], outputs,
                                          [params[i] for i in pen_rows])

        if any(getattr(s, "structured", None) is not None for s in seqs):
            logits = self._mask_structured(logits if owned else logits.clone(), seqs, drafts)

        tokens = logits.argmax(dim=-1)
        rand_rows = [i for i, p in enumerate(params) if not p.greedy]
        states: dict[int, torch.Tensor] = {}  # row -> its seeded generator's state after that row's draw
        if rand_rows:
            idx = torch.tensor(rand_rows, device=logits.device)
            sub = [params[i] for i in rand_rows]
            dev = logits.device
            temp = torch.tensor([p.temperature for p in sub], device=dev, dtype=logits.dtype)
            top_k = torch.tensor([p.top_k for p in sub], device=dev)
            top_p = torch.tensor([p.top_p for p in sub], device=dev, dtype=logits.dtype)
            min_p = torch.tensor([p.min_p for p in sub], device=dev, dtype=logits.dtype)
            probs = filter_logits(logits[idx] / temp[:, None], top_k, top_p, min_p).softmax(dim=-1)
            keep = [offsets[i + 1] > 0 if i + 1 < R else False for i in rand_rows]  # rows followed by more
            noise, kept = self._exponential_noise([owners[i] for i in rand_rows], V, dev, keep)
            states = {rand_rows[j]: state for j, state in kept.items()}
            tokens[idx] = (probs / noise).argmax(dim=-1)
        targets = tokens.tolist()

        results: list[SampleResult] = []
        row = 0
        for s, d in zip(seqs, drafts):
            emitted = _accept(s, d, targets[row:row + 1 + len(d)])
            a = len(emitted) - 1
            if a < len(d) and (row + a) in states:  # rewind the request's generator to after row a
                s.generator.set_state(states[row + a])
            lps: list[dict[int, float] | None] = [None] * len(emitted)
            if raw_logprobs is not None and s.params.logprobs is not None:
                lps = [_logprobs(raw_logprobs[row + j], s.params.logprobs, V, t) for j, t in enumerate(emitted)]
            results.append(SampleResult(emitted, lps, a))
            row += 1 + len(d)
        return results

    @staticmethod
    def _mask_structured(logits: torch.Tensor, seqs: Seq, drafts: Seq[Seq[int]]) -> torch.Tensor:
        """Mask, in place, each constrained row's tokens its grammar forbids at that position."""
        from .structured import allocate_bitmask, apply_bitmask

        bitmask = allocate_bitmask(logits.shape[0], logits.shape[1])
        rows: list[int] = []
        row = 0
        for s, d in zip(seqs, drafts):
            state = getattr(s, "structured", None)
            if state is not None:
                rows += state.fill_rows(bitmask, row, s.token_ids, d)
            row += 1 + len(d)
        if rows:
            apply_bitmask(logits, bitmask, rows)
        return logits

    def _exponential_noise(self, seqs: Seq, vocab: int, device, keep_state: Seq[bool] | None = None
                           ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Exp(1) noise [len(seqs), V]: rows of seeded requests from their own generators, in row
        order. Also returns, for the seeded rows with ``keep_state[i]``, the generator's state right
        after row i's draw (to rewind to)."""
        noise = torch.empty(len(seqs), vocab, device=device)
        states: dict[int, torch.Tensor] = {}
        shared = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if shared:
            block = torch.empty(len(shared), vocab, device=device).exponential_(generator=self.generator)
            noise[torch.tensor(shared, device=device)] = block
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                if s.generator is None:
                    s.generator = torch.Generator(device=device).manual_seed(s.params.seed)
                noise[i].exponential_(generator=s.generator)
                if keep_state is not None and keep_state[i]:
                    states[i] = s.generator.get_state()
        # exponential_ can return exactly 0 in float32; keep the division finite
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny), states


def _accept(seq, drafts: Seq[int], targets: list[int]) -> list[int]:
    """The tokens a sequence emits: its drafts while each equals the target token of its position,
    then the target token where they first differ (or after the last draft). A thinking budget's
    forced token replaces the target token of its position, as it replaces a sampled one."""
    state = getattr(seq, "thinking", None) if seq.params.thinking_token_budget is not None else None
    tail: list[int] = []
    if state is not None:
        state = copy.copy(state)  # followed along the drafts; the real one advances as tokens are appended
        tail = list(seq.token_ids[-max(len(state.start), len(state.end)):])
    emitted: list[int] = []
    for j, target in enumerate(targets):
        if state is not None:
            forced = state.forced_token(tail)
            if forced is not None:
                target = forced
            tail.append(target)
            state.observe(tail)
        emitted.append(target)
        if j == len(drafts) or target != drafts[j]:
            break
    return emitted


def _logprobs(raw: torch.Tensor, n: int, vocab: int, token: int) -> dict[int, float]:
    """{token id: raw log-probability}: the top n in descending order, plus ``token``."""
    d: dict[int, float] = {}
    n = min(n, vocab)
    if n:
        vals, ids = raw.topk(n)
        d = dict(zip(ids.tolist(), vals.tolist()))
    if token not in d:
        d[token] = float(raw[token])
    return d
