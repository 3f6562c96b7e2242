"""Turns a batch of next-token logits into tokens, each row under its own request's SamplingParams.

Order of operations per row: (raw log-probabilities for ``logprobs``) → repetition penalty →
presence/frequency penalties → greedy argmax if temperature is 0, else temperature → top-k → top-p
→ min-p → sample. Sampling uses the exponential race (argmax of p / Exp(1) noise), which draws
exactly one noise vector per row per step; a request with a seed draws it from its own generator,
so its samples do not depend on the rest of the batch.

Rows of requests whose thinking budget is spent (``Sequence.thinking``, see ``thinking``) get the
closing marker's next token in place of the sampled one, after sampling and on the host: the
forward, the noise draws and every other row are exactly as without the budget.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from .params import SamplingParams


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
        .generator, and .thinking for rows with a thinking budget). Returns the sampled token ids (the
        forced ones for spent thinking budgets) and, per row, a logprobs dict or None."""
        logits = logits.float()
        S, V = logits.shape
        params = [s.params for s in seqs]
        want_lp = [p.logprobs is not None for p in params]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_lp) else None

        pen_rows = [i for i, p in enumerate(params) if p.needs_penalties]
        if pen_rows:
            idx = torch.tensor(pen_rows, device=logits.device)
            logits = logits.clone()
            logits[idx] = apply_penalties(logits[idx], [seqs[i].prompt_token_ids for i in pen_rows],
                                          [seqs[i].output_token_ids for i in pen_rows], [params[i] for i in pen_rows])

        tokens = logits.argmax(dim=-1)
        rand_rows = [i for i, p in enumerate(params) if not p.greedy]
        if rand_rows:
            idx = torch.tensor(rand_rows, device=logits.device)
            sub = [params[i] for i in rand_rows]
            dev = logits.device
            temp = torch.tensor([p.temperature for p in sub], device=dev, dtype=logits.dtype)
            top_k = torch.tensor([p.top_k for p in sub], device=dev)
            top_p = torch.tensor([p.top_p for p in sub], device=dev, dtype=logits.dtype)
            min_p = torch.tensor([p.min_p for p in sub], device=dev, dtype=logits.dtype)
            probs = filter_logits(logits[idx] / temp[:, None], top_k, top_p, min_p).softmax(dim=-1)
            noise = self._exponential_noise([seqs[i] for i in rand_rows], V, dev)
            tokens[idx] = (probs / noise).argmax(dim=-1)

        token_list = tokens.tolist()
        for i in (i for i, p in enumerate(params) if p.thinking_token_budget is not None):
            state = getattr(seqs[i], "thinking", None)
            forced = state.forced_token(seqs[i].token_ids) if state is not None else None
            if forced is not None:
                token_list[i] = forced
        lp_out: list[dict[int, float] | None] = [None] * S
        if raw_logprobs is not None:
            for i in (i for i in range(S) if want_lp[i]):
                n = min(params[i].logprobs, V)
                d: dict[int, float] = {}
                if n:
                    vals, ids = raw_logprobs[i].topk(n)
                    d = dict(zip(ids.tolist(), vals.tolist()))
                if token_list[i] not in d:
                    d[token_list[i]] = float(raw_logprobs[i, token_list[i]])
                lp_out[i] = d
        return token_list, lp_out

    def _exponential_noise(self, seqs: Seq, vocab: int, device) -> torch.Tensor:
        """Exp(1) noise [len(seqs), V]: rows of seeded requests from their own generators."""
        noise = torch.empty(len(seqs), vocab, device=device)
        shared = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if shared:
            block = torch.empty(len(shared), vocab, device=device).exponential_(generator=self.generator)
            noise[torch.tensor(shared, device=device)] = block
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                if s.generator is None:
                    s.generator = torch.Generator(device=device).manual_seed(s.params.seed)
                noise[i].exponential_(generator=s.generator)
        # exponential_ can return exactly 0 in float32; keep the division finite
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)
