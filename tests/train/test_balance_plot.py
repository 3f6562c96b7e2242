"""Aux-loss-free router balancing, the sequence-level aux loss, and the PNG loss-curve writer."""

import struct
import zlib

import torch

from moonlet.testing import random_model, tiny_k2_config
from moonlet.train.balance import LoadBalancer
from moonlet.train.plot import line_chart


def test_bias_moves_against_the_measured_load():
    cfg = tiny_k2_config()
    model = random_model(cfg, seed=0)
    bal = LoadBalancer(model, bias_update_speed=0.01)
    before = [r.e_score_correction_bias.clone() for r in bal.routers]
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    loads = [torch.bincount(r.last_indices.flatten(), minlength=r.n_experts).double() for r in bal.routers]
    bal.observe()
    stats = bal.step()
    for r, b, load, layer in zip(bal.routers, before, loads, stats["layers"]):
        delta = r.e_score_correction_bias - b
        over, under = load > load.mean(), load < load.mean()
        assert torch.allclose(delta[over], torch.full_like(delta[over], -0.01))
        assert torch.allclose(delta[under], torch.full_like(delta[under], 0.01))
        assert abs(layer["max_violation"] - float(load.max() / load.mean() - 1)) < 1e-9
        assert abs(sum(layer["load"]) - 1) < 1e-3
    assert all(c.sum() == 0 for c in bal.counts)  # counts restart every step


def test_sequence_aux_loss_is_alpha_when_routing_is_balanced():
    cfg = tiny_k2_config(n_group=1, topk_group=1, num_experts_per_tok=2)
    model = random_model(cfg)
    bal = LoadBalancer(model, aux_alpha=0.5)
    E, k, T = cfg.n_routed_experts, 2, 8
    for r in bal.routers:  # uniform scores, each expert chosen exactly k*T/E times per sequence
        r.last_scores = torch.full((T, E), 0.3, requires_grad=True)
        r.last_indices = torch.arange(T * k).remainder(E).view(T, k)
    assert torch.isclose(bal.aux_loss(batch_size=1), torch.tensor(0.5))
    for r in bal.routers:  # everything on experts 0 and 1, which also hold the scores
        s = torch.full((T, E), 0.01)
        s[:, :2] = 0.9
        r.last_scores = s
        r.last_indices = torch.tensor([[0, 1]] * T)
    assert bal.aux_loss(batch_size=1) > 0.5 * 3


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body)
        if tag == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + 3 * w)
    return w, h, raw


def test_line_chart_writes_a_valid_png(tmp_path):
    xs = list(range(50))
    line_chart({"a": (xs, [5 / (1 + x) for x in xs]), "b": (xs, [4 / (1 + x) for x in xs])}, tmp_path / "c.png",
               width=300, height=200, log_y=True)
    w, h, raw = _read_png(tmp_path / "c.png")
    assert (w, h) == (300, 200)
    assert bytes([31, 119, 180]) in raw and bytes([214, 39, 40]) in raw  # both series' colours drawn


def test_plot_phases_offsets_each_phase_and_draws_every_colour(tmp_path):
    import json

    from moonlet.train.plot import COLORS, plot_phases

    for name, n in (("first", 30), ("second", 20)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.jsonl", "w") as fh:
            for step in range(1, n + 1):
                rec = {"step": step, "loss": 3.0 / step}
                if step % 10 == 0:
                    rec["eval_loss"] = 2.0
                fh.write(json.dumps(rec) + "\n")
    plot_phases(tmp_path, ["first", "second"], tmp_path / "p.png")
    w, h, raw = _read_png(tmp_path / "p.png")
    assert (w, h) == (800, 480)
    assert all(bytes(COLORS[i]) in raw for i in range(3))  # two phases and the eval series
