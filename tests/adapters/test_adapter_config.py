import json

import pytest

from bitalloc.adapters import AdapterQuantConfig, AdapterSpace, Variant, adapter_space, high_for_rho, lora_params
from bitalloc.quant import affine_storage_bits, binary_storage_bits


@pytest.mark.parametrize("name", ["lq2-h0-g128", "lq3-h4-g64", "lq8-h16-g32", "lq4-h2-g128-l0", "lq2-h0-g32-l0"])
def test_name_round_trip(name):
    cfg = AdapterQuantConfig.from_name(name)
    assert cfg.name == name
    assert AdapterQuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", ["lq5-h1-g128", "lq2-h1", "nf2-h1-g128", "lq2-h1-g0", "lq2-h1-g128-l1", "", None])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError):
        AdapterQuantConfig.from_name(bad)


def test_high_zero_canonicalizes_bits():
    assert AdapterQuantConfig(bits=8, high=0, group=64).name == "lq2-h0-g64"
    assert AdapterQuantConfig(bits=8, high=0, group=64) == AdapterQuantConfig(bits=3, high=0, group=64)


def test_storage_formula_by_hand():
    # B' 576 x 16 (groups of 128 down each column: 5 per column, 640 padded), A' 16 x 1536 (12 per row)
    cfg = AdapterQuantConfig(bits=3, high=4, group=128)
    high = 4 * (640 * 3 + 5 * 32) + 4 * (1536 * 3 + 12 * 32)
    low = 12 * (640 + 5 * 16) + 12 * (1536 + 12 * 16)
    assert cfg.storage_bits(576, 1536, 16) == high + low
    assert cfg.storage_bits(576, 1536, 16) == (
        affine_storage_bits(576, 4, 3, 128, dim=0) + affine_storage_bits(4, 1536, 3, 128, dim=1)
        + binary_storage_bits(576, 12, 128, dim=0) + binary_storage_bits(12, 1536, 128, dim=1)
    )
    assert cfg.code_bits(576, 1536, 16) == (4 * 3 + 12) * (576 + 1536)
    assert lora_params(576, 1536, 16) == 16 * (576 + 1536)
    assert cfg.stored_arrays(16) == 10
    assert AdapterQuantConfig(bits=3, high=16, group=128).stored_arrays(16) == 6
    dropped = AdapterQuantConfig(bits=2, high=0, group=128, low_bits=0)
    assert dropped.storage_bits(576, 1536, 16) == 0 and dropped.stored_arrays(16) == 0


def test_high_above_rank_is_refused():
    with pytest.raises(ValueError, match="more than the rank"):
        AdapterQuantConfig(bits=2, high=9, group=64).storage_bits(64, 64, 8)


def test_high_for_rho_rules():
    s = [3.0, 2.0, 1.0, 0.5]  # energies 9, 4, 1, 0.25 of 14.25
    assert high_for_rho(s, 0.6) == 1  # 9 / 14.25 = 0.63
    assert high_for_rho(s, 0.8) == 2  # 13 / 14.25 = 0.91
    assert high_for_rho(s, 0.95) == 3
    assert high_for_rho(s, 1.0) == 4
    assert high_for_rho(s, 0.6, "code") == 1  # at least 1
    assert high_for_rho(s, 0.95, "code") == 2
    assert high_for_rho([0.0, 0.0], 0.8) == 0


def test_variant_parse():
    v = Variant.parse("2@0.8")
    assert (v.bits, v.rho, v.group, v.rule) == (2, 0.8, 128, "paper")
    assert v.name == "2@0.8"
    assert Variant.parse("3@0.9-g64", rule="code").group == 64
    for bad in ("2@", "5@0.8", "2@1.5", "2-0.8"):
        with pytest.raises(ValueError):
            Variant.parse(bad)


def test_default_space_counts():
    configs = AdapterSpace().configs(8)
    assert len(configs) == 3 * (4 * 8 + 1)  # per group: h = 0 once, then 4 bit widths x h = 1..8
    assert len({c.name for c in configs}) == len(configs)


def test_space_files(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"bits": [2, 3], "groups": [128], "low_bits": [0, 1]}))
    assert len(adapter_space(grid).configs(4)) == 2 * (2 * 4 + 1)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["lq2-h1-g128", "lq3-h6-g64"]))
    assert [c.name for c in adapter_space(names).configs(4)] == ["lq2-h1-g128"]
    assert len(adapter_space(grid, groups=[32, 64]).configs(4)) == 2 * 2 * (2 * 4 + 1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bitz": [2]}))
    with pytest.raises(ValueError, match="unknown keys"):
        adapter_space(bad)
    with pytest.raises(ValueError, match="no such file"):
        adapter_space(tmp_path / "missing.json")


def test_space_dict_round_trip():
    for space in (AdapterSpace(), AdapterSpace(bits=(2,), groups=(64,), low_bits=(0, 1), highs=(0, 4)),
                  AdapterSpace(bits=(), groups=(), low_bits=(), names=("lq3-h2-g32",))):
        assert AdapterSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    with pytest.raises(ValueError, match="empty"):
        AdapterSpace(bits=(), groups=(), low_bits=())
