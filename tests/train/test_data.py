"""Token shards and the packing loader: round trip, determinism, exact resume, rank slices."""

import numpy as np
import pytest

from moonlet.train.data import PackedLoader, TokenDataset, write_dataset


def _docs(n=40, seed=0, vocab=300):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(2, 30)) if i % 7 else 45  # some longer than a row
        ids = rng.integers(0, vocab, length).tolist()
        mask = None if i % 2 else rng.integers(0, 2, length).tolist()
        docs.append((ids, mask))
    return docs


def test_round_trip_and_sharding(tmp_path):
    docs = _docs()
    write_dataset(docs, tmp_path, vocab_size=300, shard_tokens=100)
    ds = TokenDataset(tmp_path)
    assert ds.meta["dtype"] == "uint16" and len(ds.meta["shards"]) > 3
    assert len(ds.docs) == len(docs)
    for i, (ids, mask) in enumerate(docs):
        toks, m = ds.document(i)
        assert toks.tolist() == ids
        assert m.tolist() == (mask if mask is not None else [1] * len(ids))


def test_large_vocab_uses_uint32_and_bad_ids_are_rejected(tmp_path):
    write_dataset([([70000, 1, 2], None)], tmp_path / "a", vocab_size=100000)
    assert TokenDataset(tmp_path / "a").meta["dtype"] == "uint32"
    assert TokenDataset(tmp_path / "a").document(0)[0].tolist() == [70000, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        write_dataset([([5, 300], None)], tmp_path / "b", vocab_size=300)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenDataset(tmp_path / "missing")


def test_rows_pack_whole_pieces_and_cover_an_epoch(tmp_path):
    docs = _docs()
    write_dataset(docs, tmp_path, vocab_size=300)
    pad = 999  # outside the vocabulary, so padding is recognizable here
    loader = PackedLoader(TokenDataset(tmp_path), seq_len=15, batch_size=2, seed=3, pad_id=pad)
    row = 16
    pieces = []  # every document cut into row-sized pieces (1-token tails predict nothing and are dropped)
    for ids, _ in docs:
        pieces += [ids[a:a + row] for a in range(0, len(ids), row) if len(ids[a:a + row]) >= 2]
    order = loader._order.copy()
    assert sorted(order.tolist()) == list(range(len(pieces)))
    stream = []
    while loader.epoch == 0:
        toks, mask, _ = loader._row()
        real = toks[toks != pad]
        stream += real.tolist()
        assert (toks[len(real):] == pad).all() and (mask[len(real):] == 0).all()  # padding only at the end
    # the rows hold the pieces whole, in the shuffled order (the last row may run into the next epoch)
    expected = [t for k in order for t in pieces[k]]
    assert stream[:len(expected)] == expected


def test_batches_are_shifted_deterministic_and_resume_exactly(tmp_path):
    write_dataset(_docs(), tmp_path, vocab_size=300)
    ds = TokenDataset(tmp_path)
    a = PackedLoader(ds, seq_len=12, batch_size=4, seed=1)
    b = PackedLoader(ds, seq_len=12, batch_size=4, seed=1)
    first = a.next_batch()
    assert first["inputs"].shape == (4, 12)
    assert (first["inputs"][:, 1:] == first["targets"][:, :-1]).all()
    assert first["global_targets"] == int(first["mask"].sum())
    assert (b.next_batch()["inputs"] == first["inputs"]).all()
    for _ in range(7):  # run past an epoch boundary
        a.next_batch()
    state = a.state_dict()
    c = PackedLoader(ds, seq_len=12, batch_size=4, seed=1)
    c.load_state_dict(state)
    for _ in range(5):
        x, y = a.next_batch(), c.next_batch()
        assert all((x[k] == y[k]).all() for k in ("inputs", "targets", "mask"))
    with pytest.raises(ValueError, match="different dataset or seed"):
        PackedLoader(ds, seq_len=12, batch_size=4, seed=2).load_state_dict(state)


def test_ranks_split_the_global_batch(tmp_path):
    write_dataset(_docs(), tmp_path, vocab_size=300)
    ds = TokenDataset(tmp_path)
    whole = PackedLoader(ds, seq_len=12, batch_size=4, seed=5)
    parts = [PackedLoader(ds, seq_len=12, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        w = whole.next_batch()
        p = [x.next_batch() for x in parts]
        assert (np.concatenate([x["inputs"] for x in p]) == w["inputs"].numpy()).all()
        assert p[0]["global_targets"] == p[1]["global_targets"] == w["global_targets"]
    with pytest.raises(ValueError, match="divisible"):
        PackedLoader(ds, seq_len=12, batch_size=3, world_size=2)
