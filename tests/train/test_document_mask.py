"""Packed documents kept apart (TrainConfig.document_mask): the loader numbers each row's pieces,
restarts positions at each and drops the targets that cross into the next piece; the model attends
within a segment only, so a packed row gives every document exactly the logits it gets alone (the
main model and the MTP layer; dense MLA, Kimi Delta Attention and MoBA layers alike); and the
trainer's loss equals the per-document losses computed one document at a time."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moonlet.model.mtp import MTPHead
from moonlet.model.packing import SegmentLayout
from moonlet.testing import random_model, tiny_k2_config, tiny_kimi_linear_config
from moonlet.train.data import PackedLoader, TokenDataset, write_dataset
from moonlet.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    docs = []
    for i in range(60):
        ids = rng.integers(0, 320, int(rng.integers(3, 14))).tolist()
        docs.append((ids, None if i % 3 else [int(j % 2) for j in range(len(ids))]))
    write_dataset(docs, d / "train", vocab_size=320)
    return d


def _pieces_of(ds: TokenDataset) -> dict[tuple, list]:
    """Every document's token list, by its tokens (to find where a packed piece came from)."""
    return {tuple(ds.document(i)[0].tolist()): ds.document(i)[1].tolist() for i in range(len(ds.docs))}


def test_loader_numbers_pieces_restarts_positions_and_drops_crossing_targets(data):
    ds = TokenDataset(data / "train")
    plain = PackedLoader(ds, 24, 4, seed=3)
    masked = PackedLoader(ds, 24, 4, seed=3, document_mask=True)
    docs = _pieces_of(ds)
    for _ in range(5):
        a, b = plain.next_batch(), masked.next_batch()
        assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["targets"], b["targets"])
        assert b["global_targets"] == int(b["mask"].sum()) < a["global_targets"]
        for r in range(4):
            seg, pos = b["segments"][r].tolist(), b["positions"][r].tolist()
            row = b["inputs"][r].tolist() + [b["targets"][r, -1].item()]
            j = 0
            while j < len(seg) and seg[j] >= 0:
                k = j
                while k < len(seg) and seg[k] == seg[j]:
                    k += 1
                assert pos[j:k] == list(range(k - j))
                # the row's last piece may own its final target (or padding follows it there)
                end = k + 1 if k == len(seg) and tuple(row[j:k + 1]) in docs else k
                piece = tuple(row[j:end])
                assert piece in docs  # a whole document (these are shorter than a row)
                want = [float(m) for m in docs[piece][1:]][:k - j]
                assert b["mask"][r, j:k].tolist() == want[:k - j - 1] + ([want[-1]] if end == k + 1 else [0.0])
                j = k
            assert all(m == 0 for m in b["mask"][r, j:].tolist())  # padding counts nothing


def test_a_packed_row_gives_each_document_its_own_logits():
    cfg = tiny_k2_config(num_nextn_predict_layers=1)
    model = random_model(cfg, seed=1)
    mtp = MTPHead(cfg)
    torch.manual_seed(2)
    for p in mtp.parameters():
        p.data.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 4, 6]
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in lengths]
    ids = torch.cat(docs)[None]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        hidden = model.hidden_states(ids, positions=pos, segment_ids=seg)
        logits = model.lm_head(hidden)
        mlogits = mtp.forward_train(model.model.rotary_emb, hidden, ids, positions=pos, segment_ids=seg)
        unmasked = model(ids)
        start = 0
        for doc in docs:
            n = len(doc)
            alone_hidden = model.hidden_states(doc[None])
            torch.testing.assert_close(logits[0, start:start + n], model.lm_head(alone_hidden)[0], atol=2e-5, rtol=1e-4)
            alone_mtp = mtp.forward_train(model.model.rotary_emb, alone_hidden, doc[None])
            # MTP row i combines tokens i and i + 1: the rows inside this document, but its last
            torch.testing.assert_close(mlogits[0, start:start + n - 1], alone_mtp[0], atol=2e-5, rtol=1e-4)
            start += n
        assert not torch.allclose(unmasked[0, 5:14], logits[0, 5:14], atol=1e-3)  # the mask does something
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, segment_ids=seg, attention_mask=torch.ones_like(ids))


# MoBA with small blocks, so documents span several blocks and select history ones; layer 0 stays dense.
MOBA = dict(block_size=4, top_k=2, full_attention_layers=[0])
MODELS = {"kimi_linear": lambda **kw: tiny_kimi_linear_config(**kw),
          "moba": lambda **kw: tiny_k2_config(moba_config=MOBA, **kw)}


def _packed(cfg, lengths, pad, seed=0):
    """Random documents of ``lengths`` packed into one row with ``pad`` padding tokens (segment -1) at the
    end: (docs, ids [1, T], segment_ids [1, T], positions [1, T])."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in lengths]
    ids = torch.cat(docs + [torch.zeros(pad, dtype=torch.long)])[None]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad)])[None]
    return docs, ids, seg, pos


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_kda_and_moba_layers_give_each_packed_document_its_own_logits_and_gradients(kind):
    cfg = MODELS[kind]()
    model = random_model(cfg, seed=1)
    # 70 > one 64-token KDA chunk, and > 16 MoBA blocks of 4; 1: a document of one token
    lengths = [5, 70, 1, 13, 20]
    docs, ids, seg, pos = _packed(cfg, lengths, pad=7)
    logits = model(ids, positions=pos, segment_ids=seg)
    assert torch.isfinite(logits).all()  # padding too
    packed_loss = sum(F.cross_entropy(logits[0, j:j + len(d) - 1], d[1:], reduction="sum")
                      for j, d in zip(np.cumsum([0] + lengths[:-1]).tolist(), docs) if len(d) > 1)
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()), allow_unused=True)
    alone_loss = 0.0
    start = 0
    for d in docs:
        alone = model(d[None])[0]
        torch.testing.assert_close(logits[0, start:start + len(d)], alone, atol=2e-5, rtol=1e-4)
        if len(d) > 1:
            alone_loss = alone_loss + F.cross_entropy(alone[:-1], d[1:], reduction="sum")
        start += len(d)
    alone_grads = torch.autograd.grad(alone_loss, list(model.parameters()), allow_unused=True)
    for (name, _), gp, ga in zip(model.named_parameters(), packed_grads, alone_grads):
        if ga is None:
            assert gp is None or not gp.any(), name
        else:
            torch.testing.assert_close(gp, ga, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # without segment_ids the later documents see the earlier ones
        assert not torch.allclose(model(ids)[0, 5:75], logits[0, 5:75], atol=1e-3)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_the_mtp_layer_of_a_kda_or_moba_model_keeps_packed_documents_apart(kind):
    cfg = MODELS[kind](num_nextn_predict_layers=1)  # MoBA: the MTP layer is a MoBA layer too
    model = random_model(cfg, seed=1)
    mtp = MTPHead(cfg)
    torch.manual_seed(2)
    for p in mtp.parameters():
        p.data.normal_(0, 0.05)
    lengths = [6, 30, 2, 11]
    docs, ids, seg, pos = _packed(cfg, lengths, pad=4, seed=6)
    with torch.no_grad():
        hidden = model.hidden_states(ids, positions=pos, segment_ids=seg)
        mlogits = mtp.forward_train(model.model.rotary_emb, hidden, ids, positions=pos, segment_ids=seg)
        start = 0
        for doc in docs:
            n = len(doc)
            alone = mtp.forward_train(model.model.rotary_emb, model.hidden_states(doc[None]), doc[None])
            torch.testing.assert_close(mlogits[0, start:start + n - 1], alone[0], atol=2e-5, rtol=1e-4)
            start += n


def test_moba_max_logit_over_packed_documents_is_the_max_over_the_documents_alone():
    model = random_model(MODELS["moba"](), seed=3)
    docs, ids, seg, pos = _packed(model.config, [9, 30, 3], pad=5, seed=4)
    moba_layers = [layer.self_attn for layer in model.model.layers if layer.self_attn.moba is not None]
    assert moba_layers
    for m in moba_layers:
        m.record_max_logit, m.max_logit = True, None
    with torch.no_grad():
        model(ids, positions=pos, segment_ids=seg)
        packed = [m.max_logit.clone() for m in moba_layers]
        for m in moba_layers:
            m.max_logit = None
        for d in docs:
            model(d[None])
    for m, got in zip(moba_layers, packed):
        torch.testing.assert_close(got, m.max_logit)


def test_segment_layout_round_trip_and_recurring_ids():
    seg = torch.tensor([[0, 0, 1, 1, 1, 0, -1, -1], [3, 3, 3, 3, 3, 3, 3, 3]])
    layout = SegmentLayout(seg, min_row=2)
    x = torch.arange(16.0).view(2, 8, 1) + 1
    seen = []

    def record(rows, valid):
        seen.append([r[v].flatten().tolist() for r, v in zip(rows, valid)])
        return rows * 10

    out = layout.apply(record, x)
    torch.testing.assert_close(out, torch.where(seg[..., None] >= 0, x * 10, 0.0))
    rows = sorted(r for bucket in seen for r in bucket)
    # a document is every token of its id in its row, in order (as the MLA mask reads it)
    assert rows == sorted([[1.0, 2.0, 6.0], [3.0, 4.0, 5.0], [float(v) for v in range(9, 17)]])
    with pytest.raises(ValueError, match="padding"):
        SegmentLayout(torch.full((1, 4), -1)).apply(lambda r, v: r, x[:1, :4])


@pytest.mark.parametrize("model", [tiny_k2_config(num_nextn_predict_layers=1),
                                   tiny_kimi_linear_config(num_nextn_predict_layers=1, vocab_size=320),
                                   tiny_k2_config(num_nextn_predict_layers=1, moba_config=MOBA)],
                         ids=["k2", "kimi_linear", "moba"])  # MoBA: the MTP layer is a MoBA layer too
def test_trainer_loss_equals_the_documents_losses_one_by_one(data, tmp_path, model):
    cfg = TrainConfig.from_dict(dict(
        model=model.to_dict(), train_data=str(data / "train"),
        out_dir=str(tmp_path / "run"), seq_len=24, batch_size=4, max_steps=2, lr=1e-3, warmup_steps=1, eval_every=0,
        save_every=0, log_every=100, threads=1, document_mask=True, mtp_loss_weight=0.5))
    trainer = Trainer(cfg, quiet=True)
    batch = PackedLoader(TokenDataset(data / "train"), 24, 4, seed=0, document_mask=True).next_batch()
    trainer.model.eval()
    with torch.no_grad():
        loss, total = trainer._micro_loss(batch, batch["global_targets"])
        ref_main = ref_mtp = 0.0
        for r in range(4):
            seg = batch["segments"][r]
            row = torch.cat([batch["inputs"][r], batch["targets"][r, -1:]])
            for s in sorted(set(seg.tolist()) - {-1}):
                idx = (seg == s).nonzero().flatten()
                j, k = int(idx[0]), int(idx[-1]) + 1
                piece = row[j:k + 1] if k == len(seg) else row[j:k]  # the last piece may own the final target
                inputs, targets = piece[:-1], piece[1:]
                m = batch["mask"][r, j:j + len(targets)]
                h = trainer.model.hidden_states(inputs[None])
                ce = F.cross_entropy(trainer.model.lm_head(h)[0], targets, reduction="none")
                ref_main += float((ce * m).sum())
                if len(inputs) >= 2:
                    ml = trainer.mtp.forward_train(trainer.model.model.rotary_emb, h, inputs[None])[0]
                    mce = F.cross_entropy(ml, targets[1:], reduction="none")
                    ref_mtp += float((mce * m[1:]).sum())
    assert float(total) == pytest.approx(ref_main, rel=1e-4)
    want = (ref_main + 0.5 * ref_mtp) / batch["global_targets"]
    assert float(loss) == pytest.approx(want, rel=1e-4)
    trainer.model.train()
    metrics = trainer.train()  # and it trains
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)


def test_moba_max_logit_leaves_out_padded_queries():
    from moonlet.model.sparse import moba_max_logit
    gen = torch.Generator().manual_seed(5)
    lengths, T, scale = [11, 6], 16, 0.25
    q, k = (torch.randn(2, 3, T, 8, generator=gen) for _ in range(2))
    valid = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    pad = ~valid[:, None, :, None].expand(q.shape)
    q, k = q.masked_fill(pad, 50.0), k.masked_fill(pad, 50.0)  # padded slots: huge logits, if they were counted
    got = moba_max_logit(q, k, 4, 2, scale, valid=valid)
    want = torch.stack([moba_max_logit(q[i:i + 1, :, :n], k[i:i + 1, :, :n], 4, 2, scale)
                        for i, n in enumerate(lengths)]).amax(dim=0)
    torch.testing.assert_close(got, want)
