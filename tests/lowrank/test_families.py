"""The decomposition loop with either family: each config's Q comes from its own quantizer."""

import torch

from bitalloc.configs import QuantConfig
from bitalloc.lowrank import decompose, decompose_many

NAMES = ["nf3-g16-s16-r4", "int3-g16-s16-r4", "int3-g16-s16-r0", "int3-g16-s8x16-r4", "int2-g32-s4x16-r8-lr8"]


def test_decompose_many_mixes_families_and_reports_what_is_stored():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(48, 64, generator=g) + 0.3 * torch.randn(48, 2, generator=g) @ torch.randn(2, 64, generator=g)
    cfgs = [QuantConfig.from_name(n) for n in NAMES]
    results = decompose_many(W, cfgs, seed=0)
    for cfg, dec in zip(cfgs, results):
        assert dec.cfg == cfg and dec.q.config == cfg
        assert ("zeros" in dec.q.arrays()) == (cfg.family == "int")
        err = float((W - dec.reconstruct()).double().pow(2).sum())
        assert abs(err - dec.error) <= 1e-6 * err, cfg.name
    by_name = dict(zip(NAMES, results))
    assert by_name["int3-g16-s16-r4"].error < by_name["int3-g16-s16-r0"].error
    alone = decompose(W, cfgs[1], seed=0)
    assert alone.error <= by_name["int3-g16-s16-r0"].error


def test_fisher_weighted_int_decomposition_prefers_heavy_weights():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(32, 64, generator=g)
    F = torch.ones(32, 64)
    F[:4] = 100.0
    cfg = QuantConfig.from_name("int2-g16-s16-r4")
    plain = decompose(W, cfg, seed=0)
    weighted = decompose(W, cfg, F, seed=0)
    assert weighted.error_fisher is not None
    heavy = lambda d: float((W - d.reconstruct())[:4].pow(2).sum())  # noqa: E731
    assert heavy(weighted) < heavy(plain)
