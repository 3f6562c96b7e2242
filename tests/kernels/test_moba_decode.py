"""MoBA decode through an MLA decode kernel with one paged table per (sequence, head)
(``moonlet.engine.moba.moba_per_head_decode_attention``) against the engine's masked reference.

- Always: with the plain-PyTorch decode kernel, fp32 and bf16, several lengths in one batch (shorter
  than a block, exact multiples, ragged), top_k above the number of blocks, tied gate scores; and
  the tables themselves against the selection.
- On CPU under the Triton interpreter (skipped without the `triton` package): with the Triton MLA
  decode kernel, in a subprocess with TRITON_INTERPRET=1 (this file run as a script), as
  tests/kernels/test_mla_decode.py does.
- On CUDA (skipped without): the Triton kernel in bf16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from moonlet.engine.moba import (PageSums, block_means, moba_decode_attention, moba_head_tables,
                                 moba_per_head_decode_attention, select_blocks)

HAS_TRITON = importlib.util.find_spec("triton") is not None


def make_inputs(lens, heads, kv_lora, rope, page, dtype, seed=0, tie=False):
    """Random pool (each sequence in distinct shuffled pages, tables padded with an unused page), its page
    sums, queries. With ``tie`` every page holds the same entries, so all gate scores tie."""
    g = torch.Generator().manual_seed(seed)
    D = kv_lora + rope
    need = [-(-n // page) for n in lens]
    num_pages = sum(need) + 3
    pool = torch.randn(num_pages, page, D, generator=g)
    if tie:
        pool[:] = pool[0]
    pool = pool.to(dtype)
    sums = PageSums([0], num_pages, D, "cpu")
    sums.update(0, pool, torch.arange(num_pages))
    order = torch.randperm(num_pages, generator=g).tolist()
    width = max(need) + 2
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n] + [order[-1]] * (width - n))
        used += n
    q = torch.randn(len(lens), heads, D, generator=g).to(dtype)
    return q, pool, sums.layer(0), torch.tensor(tables), torch.tensor(lens)


LENS = [1, 5, 8, 9, 16, 30, 41, 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block,top_k", [(8, 2), (8, 3), (4, 1), (16, 4), (12, 20)])
def test_per_head_decode_matches_masked_reference(block, top_k, dtype):
    q, pool, sums, tables, lens = make_inputs(LENS, 3, 12, 4, 4, dtype, seed=block + top_k)
    want = moba_decode_attention(q, pool, sums, tables, lens, 0.3, 12, block, top_k)
    got = moba_per_head_decode_attention(q, pool, sums, tables, lens, 0.3, 12, block, top_k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_per_head_decode_with_tied_gate_scores():
    q, pool, sums, tables, lens = make_inputs(LENS, 3, 12, 4, 4, torch.float32, tie=True)
    want = moba_decode_attention(q, pool, sums, tables, lens, 0.3, 12, 8, 3)
    got = moba_per_head_decode_attention(q, pool, sums, tables, lens, 0.3, 12, 8, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    head_tables, _ = moba_head_tables(q, sums, tables, lens, 4, 8, 3)
    last = tables[-1].tolist()  # 64 tokens: own block 7, picks 0 and 1 (all scores tie)
    assert head_tables.view(len(LENS), 3, -1)[-1, 0].tolist() == last[0:2] + last[2:4] + last[14:16]


def test_head_tables_list_the_selection():
    """Each row's table covers exactly its head's picked blocks in full and its own block up to the query."""
    page, block, top_k = 4, 8, 3
    q, pool, sums, tables, lens = make_inputs(LENS, 3, 12, 4, page, torch.float32, seed=9)
    head_tables, head_lens = moba_head_tables(q, sums, tables, lens, page, block, top_k)
    means = block_means(sums, tables, block // page, block)
    selected = select_blocks(q, means, lens - 1, block, top_k)  # [S, h, nmb]
    for s, n in enumerate(LENS):
        page_start = {p: i * page for i, p in enumerate(tables[s, :-(-n // page)].tolist())}  # first position
        own = (n - 1) // block
        for h in range(3):
            row = s * 3 + h
            got = sorted(page_start[head_tables[row, i // page].item()] + i % page for i in range(head_lens[row]))
            picked = selected[s, h].nonzero().flatten().tolist()
            want = sorted([j * block + t for j in picked for t in range(block)] + list(range(own * block, n)))
            assert got == want, (s, h)


# ---- the Triton MLA decode kernel ----------------------------------------------------------------------

INTERPRET_CASES = [
    ("small", dict(lens=LENS, heads=3, kv_lora=32, rope=16, page=4, dtype=torch.float32), (8, 2)),
    ("top_k_above_blocks", dict(lens=[3, 40], heads=2, kv_lora=32, rope=16, page=4, dtype=torch.float32), (8, 9)),
    ("k2_width", dict(lens=[20, 70], heads=2, kv_lora=512, rope=64, page=8, dtype=torch.float32), (16, 3)),
]


def _run_interpreter_cases() -> dict:
    """Runs in the TRITON_INTERPRET=1 subprocess: each case's max error against the masked reference."""
    from moonlet.kernels import mla_decode

    assert mla_decode._INTERPRET, "TRITON_INTERPRET was not seen at import"
    results = {}
    for name, inputs, (block, top_k) in INTERPRET_CASES:
        q, pool, sums, tables, lens = make_inputs(**inputs)
        args = (q, pool, sums, tables, lens, 0.2, inputs["kv_lora"], block, top_k)
        out = moba_per_head_decode_attention(*args, decode_kernel=mla_decode.paged_decode_attention_triton)
        ref = moba_decode_attention(*args)
        results[name] = dict(err=(out - ref).abs().max().item(), finite=bool(torch.isfinite(out).all()))
    return results


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs the `triton` package")
def test_triton_kernel_under_interpreter_matches_masked_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, _, _ in INTERPRET_CASES:
        assert results[name]["finite"], name
        assert results[name]["err"] <= 2e-5, f"{name}: max error {results[name]['err']}"


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_triton_kernel_on_cuda_bf16():
    from moonlet.kernels.mla_decode import paged_decode_attention_triton

    q, pool, sums, tables, lens = (t.cuda() for t in make_inputs([100, 700, 1500], 16, 512, 64, 64,
                                                                  torch.bfloat16, seed=3))
    args = (q, pool, sums, tables, lens, 0.1, 512, 128, 4)
    out = moba_per_head_decode_attention(*args, decode_kernel=paged_decode_attention_triton)
    torch.testing.assert_close(out, moba_decode_attention(*args), rtol=2e-2, atol=2e-2)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    print(json.dumps(_run_interpreter_cases()))
