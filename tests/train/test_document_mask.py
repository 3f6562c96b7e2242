"""Packed documents kept apart (TrainConfig.document_mask): the loader numbers each row's pieces,
restarts positions at each and drops the targets that cross into the next piece; the model attends
within a segment only, so a packed row gives every document exactly the logits it gets alone (the
main model and the MTP layer); and the trainer's loss equals the per-document losses computed one
document at a time."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moonlet.model.mtp import MTPHead
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


def test_trainer_loss_equals_the_documents_losses_one_by_one(data, tmp_path):
    cfg = TrainConfig.from_dict(dict(
        model=tiny_k2_config(num_nextn_predict_layers=1).to_dict(), train_data=str(data / "train"),
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


def test_document_mask_refuses_models_it_does_not_cover(data, tmp_path):
    cfg = TrainConfig.from_dict(dict(model=tiny_kimi_linear_config().to_dict(), train_data=str(data / "train"),
                                     out_dir=str(tmp_path), seq_len=24, batch_size=2, document_mask=True))
    with pytest.raises(ValueError, match="document_mask.*Kimi Delta Attention"):
        Trainer(cfg, quiet=True)
