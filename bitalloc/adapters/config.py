"""LoRAQuant configs for one LoRA module, config spaces, the paper's b@ρ variants.

A LoRA module ``ΔW = B'·A'`` of rank ``r`` (``B'``: rows x r, ``A'``: r x cols, after the
SVD re-parameterization of :mod:`bitalloc.adapters.split`) is stored as:

* the top ``high`` components (columns of ``B'``, rows of ``A'``): ``bits``-bit asymmetric
  min-max round-to-nearest per group of ``group`` (groups run down each column of ``B'`` and
  along each row of ``A'``, each line zero-padded to a multiple of ``group``), per group an
  fp16 scale and an fp16 zero point (the group minimum, stored as a value), as
  :func:`bitalloc.quant.quantize_affine` writes them;
* the other ``r - high`` components: with ``low_bits == 1`` one sign bit per element and one
  fp16 ``mean |w|`` per group (:func:`bitalloc.quant.quantize_binary`); with ``low_bits == 0``
  they are dropped (nothing stored).

There are no per-module constants: shapes and config names live in the JSON metadata, which
the model's ``apply`` does not count either. The name grammar is ``lq{bits}-h{high}-g{group}``
with a ``-l0`` suffix when the low part is dropped and a ``-fit`` suffix when each high group's
scale and zero point are fitted by least squares (:mod:`bitalloc.adapters.fit`; same storage),
e.g. ``lq2-h3-g128`` or ``lq2-h3-g128-fit``; with ``high == 0`` the high bits and the fit carry
no meaning and are canonicalized to 2 and off.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from bitalloc.configs import read_space_file
from bitalloc.quant.affine import affine_storage_bits, binary_storage_bits

HIGH_BITS = (2, 3, 4, 8)
LOW_BITS = (0, 1)
DEFAULT_GROUPS = (32, 64, 128)
#: The paper's variants (group 128): b@ρ.
PAPER_VARIANTS = ("2@0.8", "2@0.9", "3@0.8", "3@0.9")
#: How h follows from ρ: "paper" (smallest count reaching ρ) or "code" (the released code's one less, at least 1).
H_RULES = ("paper", "code")

_NAME_RE = re.compile(r"^lq(?P<bits>\d+)-h(?P<high>\d+)-g(?P<group>\d+)(?P<l0>-l0)?(?P<fit>-fit)?$")
_VARIANT_RE = re.compile(r"^(?P<bits>\d+)@(?P<rho>[01]?(?:\.\d+)?)(?:-g(?P<group>\d+))?$")


def _check_int(value: Any, what: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}")


def _check_module(rows: int, cols: int, rank: int) -> None:
    for value, what in ((rows, "rows"), (cols, "cols"), (rank, "rank")):
        _check_int(value, f"a LoRA module's {what}", 1)


@dataclass(frozen=True, order=True)
class AdapterQuantConfig:
    """How one LoRA module is stored: ``high`` components at ``bits`` bits, the rest at ``low_bits``;
    ``fit``: the high groups' scales and zeros fitted by least squares instead of min-max."""

    bits: int = 2
    high: int = 0
    group: int = 128
    low_bits: int = 1
    fit: bool = False

    def __post_init__(self) -> None:
        for name in ("bits", "high", "group", "low_bits"):
            _check_int(getattr(self, name), f"AdapterQuantConfig.{name}", 0)
        if self.bits not in HIGH_BITS:
            raise ValueError(f"AdapterQuantConfig.bits must be one of {HIGH_BITS}, got {self.bits}")
        if self.group < 1:
            raise ValueError(f"AdapterQuantConfig.group must be >= 1, got {self.group}")
        if self.low_bits not in LOW_BITS:
            raise ValueError(f"AdapterQuantConfig.low_bits must be 1 (sign) or 0 (dropped), got {self.low_bits}")
        if not isinstance(self.fit, bool):
            raise ValueError(f"AdapterQuantConfig.fit must be True or False, got {self.fit!r}")
        if self.high == 0:
            object.__setattr__(self, "bits", HIGH_BITS[0])
            object.__setattr__(self, "fit", False)

    # ----- names -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The stable name, e.g. ``lq2-h3-g128`` (``-l0``: low part dropped; ``-fit``: fitted scales)."""
        return (f"lq{self.bits}-h{self.high}-g{self.group}" + ("-l0" if self.low_bits == 0 else "")
                + ("-fit" if self.fit else ""))

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_name(cls, name: str) -> "AdapterQuantConfig":
        """Parse a name written by :attr:`name`; raises ValueError on anything else."""
        m = _NAME_RE.match(name.strip()) if isinstance(name, str) else None
        if m is None:
            raise ValueError(
                f"invalid adapter config name {name!r}: expected 'lq{{bits}}-h{{high}}-g{{group}}[-l0][-fit]', "
                "e.g. 'lq2-h3-g128' or 'lq2-h3-g128-fit'"
            )
        return cls(bits=int(m["bits"]), high=int(m["high"]), group=int(m["group"]), low_bits=0 if m["l0"] else 1,
                   fit=bool(m["fit"]))

    def replace(self, **changes: Any) -> "AdapterQuantConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterQuantConfig":
        """Inverse of :meth:`to_dict`."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    # ----- accounting --------------------------------------------------------------------
    def check_rank(self, rank: int) -> None:
        """Raise ValueError when this config needs more high components than ``rank``."""
        _check_int(rank, "a LoRA rank", 1)
        if self.high > rank:
            raise ValueError(f"config {self.name} keeps {self.high} high components, more than the rank {rank}")

    def storage_bits(self, rows: int, cols: int, rank: int) -> int:
        """Every bit stored for a rows x cols module of rank ``rank``: codes (padding included),
        fp16 scales, fp16 zero points; equal to 8x the bytes ``apply`` writes up to one byte
        per stored array (see :meth:`stored_arrays`)."""
        _check_module(rows, cols, rank)
        self.check_rank(rank)
        total = 0
        if self.high:
            total += affine_storage_bits(rows, self.high, self.bits, self.group, dim=0)  # B' columns
            total += affine_storage_bits(self.high, cols, self.bits, self.group, dim=1)  # A' rows
        low = rank - self.high
        if low and self.low_bits:
            total += binary_storage_bits(rows, low, self.group, dim=0)
            total += binary_storage_bits(low, cols, self.group, dim=1)
        return total

    def code_bits(self, rows: int, cols: int, rank: int) -> int:
        """The paper's codes-only count: ``(high·bits + (rank - high)·low_bits)·(rows + cols)``."""
        _check_module(rows, cols, rank)
        self.check_rank(rank)
        return (self.high * self.bits + (rank - self.high) * self.low_bits) * (rows + cols)

    def stored_arrays(self, rank: int) -> int:
        """How many arrays ``apply`` writes (each rounds up to whole bytes once)."""
        self.check_rank(rank)
        high = 6 if self.high else 0  # codes, scales, zeros of B' and of A'
        low = 4 if rank > self.high and self.low_bits else 0  # codes, scales of B' and of A'
        return high + low


def lora_params(rows: int, cols: int, rank: int) -> int:
    """Parameters of a LoRA module: ``rank·(rows + cols)`` (the denominator of bits/param)."""
    _check_module(rows, cols, rank)
    return rank * (rows + cols)


# ----- config spaces ---------------------------------------------------------------------
def _unique(configs: Iterable[AdapterQuantConfig]) -> list[AdapterQuantConfig]:
    seen: dict[str, AdapterQuantConfig] = {}
    for cfg in configs:
        seen.setdefault(cfg.name, cfg)
    return list(seen.values())


def _ints(value: Any, what: str) -> tuple[int, ...]:
    values = [value] if isinstance(value, numbers.Integral) else list(value)
    for v in values:
        _check_int(v, f"adapter config space {what}", 0)
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class AdapterSpace:
    """A config space: ``bits`` x ``groups`` x ``low_bits`` x ``fit`` x every h from 0 to the
    rank (or only ``highs`` when given), plus explicit config ``names``."""

    bits: tuple[int, ...] = HIGH_BITS
    groups: tuple[int, ...] = DEFAULT_GROUPS
    low_bits: tuple[int, ...] = (1,)
    highs: tuple[int, ...] | None = None
    names: tuple[str, ...] = ()
    fit: tuple[bool, ...] = (False,)

    def __post_init__(self) -> None:
        for field in ("bits", "groups", "low_bits"):
            object.__setattr__(self, field, _ints(getattr(self, field), field))
        fits = (self.fit,) if isinstance(self.fit, bool) else tuple(self.fit)
        if not fits or not all(isinstance(f, bool) for f in fits):
            raise ValueError(f"adapter config space fit must be a list of true/false, got {self.fit!r}")
        object.__setattr__(self, "fit", fits)
        if self.highs is not None:
            object.__setattr__(self, "highs", _ints(self.highs, "highs"))
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        grid = self.bits and self.groups and self.low_bits and self.highs != ()
        if not grid and not self.names:
            raise ValueError("the adapter config space is empty: give bits, groups and low_bits, or config names")
        top = max(self.highs) if self.highs else 0
        self.configs(max(top, max((AdapterQuantConfig.from_name(n).high for n in self.names), default=0), 1))

    def configs(self, rank: int) -> list[AdapterQuantConfig]:
        """Every config of the space for a module of rank ``rank`` (h above the rank left out)."""
        highs = range(rank + 1) if self.highs is None else [h for h in self.highs if h <= rank]
        grid = (
            AdapterQuantConfig(bits=b, high=h, group=g, low_bits=lb, fit=f)
            for g, f, b, lb, h in itertools.product(self.groups, self.fit, self.bits, self.low_bits, highs)
        )
        named = (AdapterQuantConfig.from_name(n) for n in self.names)
        return _unique(c for c in itertools.chain(grid, named) if c.high <= rank)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"bits": list(self.bits), "groups": list(self.groups), "low_bits": list(self.low_bits),
                "highs": None if self.highs is None else list(self.highs), "names": list(self.names),
                "fit": list(self.fit)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterSpace":
        """Inverse of :meth:`to_dict` (missing keys take the defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})


def adapter_space(spec: str | Path | None = None, groups: Sequence[int] | None = None) -> AdapterSpace:
    """The default space (b in {2,3,4,8}, every h, groups {32,64,128}), or one from a JSON/YAML
    file holding a grid ``{"bits": [...], "groups": [...], "low_bits": [...], "highs": [...],
    "fit": [false, true], "names": [...]}`` (missing keys take the defaults) or a list of config names; ``groups``
    overrides the grid's groups."""
    if spec is None or str(spec) == "default":
        space = AdapterSpace()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"adapter config space {str(spec)!r}: no such file (use 'default' or a JSON/YAML file)")
        data = read_space_file(path, "adapter config space file")
        if isinstance(data, list):
            if not data or not all(isinstance(n, str) for n in data):
                raise ValueError(f"adapter config space file {path}: a list must hold config names like 'lq2-h3-g128'")
            space = AdapterSpace(bits=(), groups=(), low_bits=(), names=tuple(data))
        elif isinstance(data, dict):
            known = {"bits", "groups", "low_bits", "highs", "names", "fit"}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"adapter config space file {path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
            space = AdapterSpace.from_dict(data)
        else:
            raise ValueError(f"adapter config space file {path} must hold a grid dict or a list of config names")
    if groups is not None:
        space = dataclasses.replace(space, groups=tuple(int(g) for g in groups))
    return space


# ----- the paper's fixed rule --------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """LoRAQuant's fixed rule ``b@ρ``: per module the h whose squared singular values reach ρ."""

    bits: int
    rho: float
    group: int = 128
    rule: str = "paper"

    def __post_init__(self) -> None:
        if self.bits not in HIGH_BITS:
            raise ValueError(f"variant bits must be one of {HIGH_BITS}, got {self.bits}")
        if not (isinstance(self.rho, numbers.Real) and 0.0 < float(self.rho) <= 1.0):
            raise ValueError(f"variant rho must be in (0, 1], got {self.rho!r}")
        _check_int(self.group, "variant group", 1)
        if self.rule not in H_RULES:
            raise ValueError(f"h rule must be one of {H_RULES}, got {self.rule!r}")

    @property
    def name(self) -> str:
        """``2@0.8`` (``-g64`` when the group is not 128)."""
        return f"{self.bits}@{self.rho:g}" + ("" if self.group == 128 else f"-g{self.group}")

    @classmethod
    def parse(cls, text: str, rule: str = "paper") -> "Variant":
        """Parse ``b@ρ[-g{group}]``, e.g. ``2@0.8`` or ``3@0.9-g64``."""
        m = _VARIANT_RE.match(text.strip()) if isinstance(text, str) else None
        if m is None or m["rho"] in ("", "."):
            raise ValueError(f"invalid variant {text!r}: expected 'b@rho[-g{{group}}]', e.g. '2@0.8' or '3@0.9-g64'")
        return cls(bits=int(m["bits"]), rho=float(m["rho"]), group=int(m["group"] or 128), rule=rule)

    def high(self, singular_values: Sequence[float]) -> int:
        """h for one module (see :func:`high_for_rho`)."""
        return high_for_rho(singular_values, self.rho, self.rule)

    def config(self, singular_values: Sequence[float]) -> AdapterQuantConfig:
        """The config this rule gives a module with these singular values."""
        return AdapterQuantConfig(bits=self.bits, high=self.high(singular_values), group=self.group)


def high_for_rho(singular_values: Sequence[float], rho: float, rule: str = "paper") -> int:
    """The smallest h whose top-h squared singular values reach ``rho`` of their sum ("paper");
    one less, at least 1 ("code", the released implementation). 0 for an all-zero module."""
    energy = [float(s) ** 2 for s in singular_values]
    total = sum(energy)
    if rule not in H_RULES:
        raise ValueError(f"h rule must be one of {H_RULES}, got {rule!r}")
    if total <= 0.0:
        return 0
    target = rho * total
    running, h = 0.0, len(energy)
    for i, e in enumerate(sorted(energy, reverse=True)):
        running += e
        if running >= target * (1 - 1e-12):
            h = i + 1
            break
    if rule == "code":
        h = max(1, h - 1)
    return min(h, len(energy))

