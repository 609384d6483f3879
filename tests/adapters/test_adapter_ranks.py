"""Adapters of several ranks in one profile, PEFT's rank_pattern/alpha_pattern, and the PEFT export."""

import math

import pytest
import torch

from bitalloc.adapters import (
    apply_adapters,
    load_adapter,
    load_adapter_profile,
    profile_adapters,
    read_adapter,
    solve_adapters,
)

from adapter_helpers import make_adapter, tiny_base


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    low = make_adapter(root / "low", seed=5, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    patterned = make_adapter(root / "patterned", seed=6, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6})
    return root, [low, patterned]


def test_rank_and_alpha_patterns(mixed):
    from peft import PeftModel

    _, (_, patterned) = mixed
    adapter = read_adapter(patterned)
    for module in adapter.modules:
        if module.name.endswith("v_proj"):
            assert module.rank == 2 and math.isclose(module.scale, 6 / 2)
        else:
            assert module.rank == 8 and math.isclose(module.scale, 16 / 8)
    merged = dict(PeftModel.from_pretrained(tiny_base(), str(patterned)).merge_and_unload().named_modules())
    base = dict(tiny_base().named_modules())
    for module in adapter.modules:
        delta = (merged[module.name].weight - base[module.name].weight).double()
        torch.testing.assert_close(delta, module.delta(), rtol=0, atol=1e-6)


def test_mixed_ranks_profile_solve_apply(mixed):
    from peft import PeftModel

    root, dirs = mixed
    prof = load_adapter_profile(profile_adapters(dirs, root / "profile", groups=[32]))
    per_rank = prof.table.groupby("rank")["high"].max().to_dict()
    assert per_rank == {2: 2, 4: 4, 8: 8}  # no config keeps more components than a module has
    alloc = solve_adapters(prof, 2.5)
    assert alloc.to_dict()["status"] == "optimal"
    out = apply_adapters(alloc, root / "out", dequantized=True)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    for directory in dirs:
        loaded = load_adapter(out, directory.name)
        model = PeftModel.from_pretrained(tiny_base(), str(out / directory.name / "peft")).eval()
        reference = tiny_base()
        modules = dict(reference.named_modules())
        with torch.no_grad():
            for name, (b, a) in loaded.factors.items():
                modules[name].weight += b @ a
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=2e-5)
