"""The least-squares scale/zero fit of the high part (configs named ``...-fit``)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bitalloc.adapters import (
    AdapterQuantConfig,
    AdapterSpace,
    apply_adapters,
    config_errors,
    load_adapter,
    load_adapter_profile,
    profile_adapters,
    read_adapter,
    solve_adapters,
    svd_split,
)
from bitalloc.adapters.fit import fit_affine, fit_groups
from bitalloc.adapters.split import dequantized_factors, fake_affine
from bitalloc.quant import quantize_affine, quantize_binary


def _group_errors(x: torch.Tensor, decoded: torch.Tensor, group: int) -> torch.Tensor:
    """Per group (along rows, zero-padded) squared error."""
    d = (x - decoded).double() ** 2
    pad = -d.shape[1] % group
    return torch.nn.functional.pad(d, (0, pad)).reshape(d.shape[0], -1, group).sum(dim=-1)


@pytest.mark.parametrize("length,group", [(128, 32), (100, 32), (40, 128), (7, 3)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fit_is_never_worse_than_min_max_per_group(length, group, bits):
    gen = torch.Generator().manual_seed(length * 10 + bits)
    x = torch.randn(6, length, generator=gen) * torch.logspace(-3, 1, 6).unsqueeze(1)
    x[0, :group] = 0.25  # a constant group
    minmax = quantize_affine(x, bits, group, dim=1).dequantize()
    fitted = fit_affine(x, bits, group, dim=1).dequantize()
    e_minmax, e_fit = _group_errors(x, minmax, group), _group_errors(x, fitted, group)
    # the fit compares errors from float64 group sums; the decoded float32 values differ by rounding only
    scale = _group_errors(x, torch.zeros_like(x), group)
    assert bool((e_fit <= e_minmax * (1 + 1e-6) + 1e-12 * scale).all())
    if bits == 2 and length >= 32:
        assert float(e_fit.sum()) < 0.8 * float(e_minmax.sum())  # and it pays at low bits


def test_each_round_keeps_the_best_so_far():
    x = torch.randn(50, 4, 128, generator=torch.Generator().manual_seed(7))
    errors = []
    for rounds in (0, 1, 2, 4, 8):
        q, s, z = fit_groups(x, None, 2, rounds=rounds)
        errors.append(float(((q * s + z - x).double() ** 2).sum()))
    assert all(b <= a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.6 * errors[0]


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape,group", [((96, 5), 32), ((70, 3), 32), ((5, 7), 3)])
def test_fit_affine_layout_storage_and_profile_values(shape, group, dim):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    for bits in (2, 3, 8):
        fitted, plain = fit_affine(x, bits, group, dim), quantize_affine(x, bits, group, dim)
        assert {k: (v.dtype, v.numel()) for k, v in fitted.arrays().items()} == \
            {k: (v.dtype, v.numel()) for k, v in plain.arrays().items()}
        assert fitted.nbytes == plain.nbytes and fitted.storage_bits() == plain.storage_bits()
        lines = x.t() if dim == 0 else x
        expect = fake_affine(lines, bits, group, fit=True)
        got = fitted.dequantize()
        assert torch.equal(got.t() if dim == 0 else got, expect)


def test_the_binary_mean_is_already_the_least_squares_scale():
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    q = quantize_binary(x, 128, dim=1)
    best = float(((x - q.dequantize()) ** 2).sum())
    for factor in (0.98, 0.995, 1.005, 1.02):
        assert float(((x - factor * q.dequantize()) ** 2).sum()) > best


@pytest.mark.parametrize("name", ["lq2-h3-g128-fit", "lq4-h2-g128-l0-fit", "lq8-h16-g32-fit"])
def test_fit_names_round_trip(name):
    cfg = AdapterQuantConfig.from_name(name)
    assert cfg.fit and cfg.name == name
    assert AdapterQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    plain = cfg.replace(fit=False)
    assert plain.storage_bits(576, 1536, 16) == cfg.storage_bits(576, 1536, 16)
    assert plain.code_bits(576, 1536, 16) == cfg.code_bits(576, 1536, 16)


def test_fit_name_edge_cases():
    assert AdapterQuantConfig(bits=3, high=0, group=64, fit=True).name == "lq2-h0-g64"
    for bad in ("lq2-h1-g128-fit-l0", "lq2-h1-g128-fitted", "lq2-h1-g128--fit"):
        with pytest.raises(ValueError):
            AdapterQuantConfig.from_name(bad)
    with pytest.raises(ValueError, match="fit"):
        AdapterQuantConfig(bits=2, high=1, group=128, fit=1)


def test_fit_spaces(tmp_path):
    both = AdapterSpace(bits=(2, 3), groups=(128,), fit=(False, True))
    assert len(both.configs(4)) == 1 + 2 * 2 * 4  # h = 0 once
    assert AdapterSpace.from_dict(json.loads(json.dumps(both.to_dict()))) == both
    assert AdapterSpace.from_dict({"bits": [2]}).fit == (False,)  # spaces written without the key
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"bits": [2], "groups": [32], "fit": [True]}))
    from bitalloc.adapters import adapter_space

    assert [c.name for c in adapter_space(grid).configs(2)] == ["lq2-h0-g32", "lq2-h1-g32-fit", "lq2-h2-g32-fit"]
    with pytest.raises(ValueError, match="fit"):
        AdapterSpace(fit=("yes",))


def test_profiled_fit_errors_match_dense_products():
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(3, 8, 70, generator=gen) * 0.1
    b = torch.randn(3, 40, 8, generator=gen) * 0.05 * 0.6 ** torch.arange(8.0)
    f = svd_split(a, b, 2.0)
    configs = AdapterSpace(bits=(2, 3), groups=(32,), fit=(False, True)).configs(8)
    errors = config_errors(f, configs)
    dense = f.b @ f.a
    for j, cfg in enumerate(configs):
        bh, ah = dequantized_factors(f, cfg)
        expect = ((dense - bh.double() @ ah.double()) ** 2).sum(dim=(1, 2)).numpy()
        np.testing.assert_allclose(errors[:, j], expect, rtol=1e-8, atol=1e-14)
    col = {c.name: j for j, c in enumerate(configs)}
    assert errors[:, col["lq2-h8-g32-fit"]].sum() < errors[:, col["lq2-h8-g32"]].sum()


def test_fit_profile_solve_apply_load(adapter_dirs, tmp_path):
    space = AdapterSpace(bits=(2, 3), groups=(32,), fit=(True,))
    profile = profile_adapters(adapter_dirs, tmp_path / "profile", space=space)
    alloc = solve_adapters(profile, 2.2)
    assert any(name.endswith("-fit") for name in alloc.assignments.values())
    alloc.save(tmp_path / "alloc.json")
    out = apply_adapters(tmp_path / "alloc.json", tmp_path / "out")
    table = load_adapter_profile(profile).table.set_index(["matrix", "config"])
    for directory in adapter_dirs:
        adapter = read_adapter(directory)
        loaded = load_adapter(out, adapter.name)
        info = json.loads((out / adapter.name / "adapter_quant.json").read_text())
        tensors = load_file(str(out / adapter.name / "adapter_quant.safetensors"))
        for module in adapter.modules:
            cfg = AdapterQuantConfig.from_name(alloc.assignments[f"{adapter.name}/{module.name}"])
            m = info["modules"][module.name]
            written = sum(tensors[k].numel() * tensors[k].element_size() for k in m["arrays"])
            assert 0 <= 8 * written - cfg.storage_bits(module.rows, module.cols, module.rank) <= 7 * len(m["arrays"])
            b, a = dequantized_factors(svd_split(module.lora_a, module.lora_b, module.scale), cfg)
            assert torch.equal(loaded.factors[module.name][0], b[0])
            assert torch.equal(loaded.factors[module.name][1], a[0])
            error = float(((module.delta() - loaded.delta(module.name).double()) ** 2).sum())
            assert error == pytest.approx(float(table.loc[(f"{adapter.name}/{module.name}", cfg.name), "error"]), rel=1e-6)
