"""Quantization configs, config spaces and exact storage accounting.

A :class:`QuantConfig` describes how one weight matrix ``W`` (rows x cols) is stored as
``Q + L1 @ L2``:

* ``Q``: ``bits``-bit codes in blocks of ``block`` consecutive weights along a row (each row
  is zero-padded to a multiple of ``block``), one scale per block. Two families
  (``family``): ``nf``, NormalFloat levels times the block's absmax; ``int``, asymmetric
  integers ``(code - zero) * step`` with the block's step ``(hi - lo) / (2**bits - 1)`` (``lo``,
  ``hi`` the block's minimum and maximum, widened to include 0) as its scale and a
  ``bits``-bit integer zero point per block, stored packed beside the codes.
* Block scales: with ``scale_bits == 16`` stored as fp16. Otherwise double-quantized:
  a per-matrix fp32 offset (the minimum scale) is subtracted and the rest is stored as
  ``scale_bits``-bit unsigned codes, in groups of ``scale_block`` blocks, each group with one
  second-level scale in ``scale_dtype`` (fp16 or fp32).
* ``L1`` (rows x rank) and ``L2`` (rank x cols): bf16 (``lowrank_bits == 16``) or NF8
  (``lowrank_bits == 8``, see :data:`LOWRANK_NF8`), ``L1`` stored transposed so that its
  blocks run along its long side.

``storage_bits`` counts every one of those bits; the packed arrays written by
``bitalloc.quantize`` and ``apply`` take ``ceil(bits / 8)`` bytes each, so the two agree up
to one byte of padding per stored array.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

NF_BITS = (2, 3, 4, 8)
#: Code families: NormalFloat levels with absmax scales, asymmetric integers with zero points.
FAMILIES = ("nf", "int")
SCALE_DTYPE_BITS = {"fp16": 16, "fp32": 32}
OFFSET_BITS = 32  # the per-matrix fp32 offset of double-quantized scales
LOWRANK_BITS = (16, 8)
#: Block sizes a usual config has: powers of two from 8 to 1024 (LQ-LoRA's grid uses 16..64, the
#: default space 16..64, GPU kernels powers of two). Any other is refused unless explicitly allowed,
#: so that a digit typo (``g46``) fails before any work instead of running a full profile or apply.
USUAL_BLOCKS = tuple(2**k for k in range(3, 11))
#: Second-level group sizes (blocks per double-quantized scale group) a usual config has: powers of
#: two from 4 to 1024 (LQ-LoRA's grid: 16, 64, 256).
USUAL_SCALE_BLOCKS = tuple(2**k for k in range(2, 11))
ALLOW_UNUSUAL_HINT = "pass --allow-unusual-config (allow_unusual=True) to use it anyway"

_NAME_RE = re.compile(
    r"^(?P<family>nf|int)(?P<bits>\d+)-g(?P<block>\d+)-s(?P<scale_bits>\d+)(?:x(?P<scale_block>\d+))?"
    r"(?P<fp32>-fp32)?-r(?P<rank>\d+)(?P<lr8>-lr8)?$"
)


@dataclass(frozen=True, order=True)
class QuantConfig:
    """How one matrix is stored: NF or integer codes, (double-quantized) block scales, the integer
    family's zero points, low-rank factors.

    The name grammar is ``{family}{bits}-g{block}-s{scale_bits}x{scale_block}[-fp32]-r{rank}[-lr8]``
    with ``family`` ``nf`` or ``int`` (``nf4-g64-s16-r0`` when scales are plain fp16);
    :meth:`from_name` parses it back. A config dict without ``family`` (older files) reads as NF.
    """

    bits: int = 4
    block: int = 64
    scale_bits: int = 8
    scale_block: int = 256
    scale_dtype: str = "fp16"
    rank: int = 0
    lowrank_bits: int = 16
    family: str = "nf"

    def __post_init__(self) -> None:
        for field in ("bits", "block", "scale_bits", "scale_block", "rank", "lowrank_bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"QuantConfig.{field} must be an int, got {value!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"QuantConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.bits not in NF_BITS:
            raise ValueError(f"QuantConfig.bits must be one of {NF_BITS}, got {self.bits}")
        if self.block < 1:
            raise ValueError(f"QuantConfig.block must be >= 1, got {self.block}")
        if not (2 <= self.scale_bits <= 8 or self.scale_bits == 16):
            raise ValueError(
                f"QuantConfig.scale_bits must be 2..8 (double-quantized) or 16 (fp16), "
                f"got {self.scale_bits}"
            )
        if self.scale_dtype not in SCALE_DTYPE_BITS:
            raise ValueError(
                f"QuantConfig.scale_dtype must be one of {sorted(SCALE_DTYPE_BITS)}, "
                f"got {self.scale_dtype!r}"
            )
        if self.scale_block < 1:
            raise ValueError(f"QuantConfig.scale_block must be >= 1, got {self.scale_block}")
        if self.rank < 0:
            raise ValueError(f"QuantConfig.rank must be >= 0, got {self.rank}")
        if self.lowrank_bits not in LOWRANK_BITS:
            raise ValueError(
                f"QuantConfig.lowrank_bits must be one of {LOWRANK_BITS}, got {self.lowrank_bits}"
            )
        if self.scale_bits == 16:
            # No second level: its fields carry no meaning; canonicalize them.
            object.__setattr__(self, "scale_block", 1)
            object.__setattr__(self, "scale_dtype", "fp16")
        if self.rank == 0:
            object.__setattr__(self, "lowrank_bits", 16)

    # ----- names -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The stable name, e.g. ``nf3-g64-s8x256-r64`` or ``int3-g64-s16-r0``."""
        if self.scale_bits == 16:
            scales = "s16"
        else:
            scales = f"s{self.scale_bits}x{self.scale_block}"
            if self.scale_dtype == "fp32":
                scales += "-fp32"
        name = f"{self.family}{self.bits}-g{self.block}-{scales}-r{self.rank}"
        if self.lowrank_bits == 8 and self.rank > 0:
            name += "-lr8"
        return name

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_name(cls, name: str, *, allow_unusual: bool = False) -> "QuantConfig":
        """Parse a name written by :attr:`name`; raises ValueError on anything else.

        A valid but unusual config (see :func:`unusual_reasons`, e.g. a block of 46) is refused
        with the nearest known names unless ``allow_unusual``; readers of stored files pass True.
        """
        if not isinstance(name, str):
            raise ValueError(f"a config name must be a string, got {name!r}")
        m = _NAME_RE.match(name.strip())
        if m is None:
            near = nearest_config_names(name.strip())
            hint = f"; did you mean {' or '.join(repr(c) for c in near)}?" if near else ""
            raise ValueError(
                f"invalid config name {name!r}: expected "
                "'{nf|int}{bits}-g{block}-s{scale_bits}x{scale_block}[-fp32]-r{rank}[-lr8]' "
                "(e.g. 'nf3-g64-s8x256-r64') or '{nf|int}{bits}-g{block}-s16-r{rank}' (e.g. 'int3-g64-s16-r0')"
                + hint
            )
        scale_bits = int(m["scale_bits"])
        if scale_bits == 16:
            if m["scale_block"] is not None or m["fp32"]:
                raise ValueError(
                    f"invalid config name {name!r}: fp16 scales ('s16') take no "
                    "second-level group ('x...') or '-fp32'"
                )
            scale_block = 1
        else:
            if m["scale_block"] is None:
                raise ValueError(
                    f"invalid config name {name!r}: double-quantized scales need a group "
                    f"size, e.g. 's{scale_bits}x256'"
                )
            scale_block = int(m["scale_block"])
        rank = int(m["rank"])
        if m["lr8"] and rank == 0:
            raise ValueError(f"invalid config name {name!r}: '-lr8' needs rank > 0")
        cfg = cls(
            bits=int(m["bits"]),
            block=int(m["block"]),
            scale_bits=scale_bits,
            scale_block=scale_block,
            scale_dtype="fp32" if m["fp32"] else "fp16",
            rank=rank,
            lowrank_bits=8 if m["lr8"] else 16,
            family=m["family"],
        )
        if not allow_unusual:
            check_usual(cfg, spelled=name.strip())
        return cfg

    def replace(self, **changes: Any) -> "QuantConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    # ----- accounting --------------------------------------------------------------------
    def quant_bits(self, rows: int, cols: int) -> int:
        """Bits of the quantized part Q alone (codes, scales, zero points, constants), padding included."""
        _check_shape(rows, cols)
        blocks_per_row = -(-cols // self.block)
        n_blocks = rows * blocks_per_row
        code_bits = n_blocks * self.block * self.bits
        if self.family == "int":  # one ``bits``-bit integer zero point per block
            code_bits += n_blocks * self.bits
        if self.scale_bits == 16:
            scale_bits = n_blocks * 16
        else:
            n_groups = -(-n_blocks // self.scale_block)
            scale_bits = (
                n_blocks * self.scale_bits
                + n_groups * SCALE_DTYPE_BITS[self.scale_dtype]
                + OFFSET_BITS
            )
        return code_bits + scale_bits

    def lowrank_storage_bits(self, rows: int, cols: int) -> int:
        """Bits of the low-rank factors L1 (rows x rank) and L2 (rank x cols)."""
        _check_shape(rows, cols)
        if self.rank == 0:
            return 0
        if self.lowrank_bits == 16:
            return 16 * self.rank * (rows + cols)
        # NF8 factors: L1 stored transposed (rank x rows) and L2 (rank x cols).
        return LOWRANK_NF8.quant_bits(self.rank, rows) + LOWRANK_NF8.quant_bits(self.rank, cols)

    def storage_bits(self, rows: int, cols: int) -> int:
        """Every bit stored for a rows x cols matrix: Q and the low-rank factors."""
        return self.quant_bits(rows, cols) + self.lowrank_storage_bits(rows, cols)

    def bits_per_param(self, rows: int, cols: int) -> float:
        """``storage_bits / (rows * cols)``."""
        return self.storage_bits(rows, cols) / (rows * cols)

    def stored_arrays(self) -> int:
        """How many packed arrays Q is stored as (for the one-byte-per-array padding rule)."""
        return (2 if self.scale_bits == 16 else 4) + (self.family == "int")


#: How NF8 low-rank factors are stored: NF8 codes in blocks of 64 with fp16 scales.
LOWRANK_NF8 = QuantConfig(bits=8, block=64, scale_bits=16)


def unusual_reasons(cfg: QuantConfig) -> list[str]:
    """Why ``cfg`` is valid but unusual (empty when usual): a block or scale group size outside
    :data:`USUAL_BLOCKS` / :data:`USUAL_SCALE_BLOCKS`."""
    reasons = []
    if cfg.block not in USUAL_BLOCKS:
        reasons.append(f"block {cfg.block} is not a power of two from {USUAL_BLOCKS[0]} to {USUAL_BLOCKS[-1]}")
    if cfg.scale_bits != 16 and cfg.scale_block not in USUAL_SCALE_BLOCKS:
        reasons.append(f"scale group {cfg.scale_block} is not a power of two from {USUAL_SCALE_BLOCKS[0]} "
                       f"to {USUAL_SCALE_BLOCKS[-1]}")
    return reasons


def known_config_names(rank: int = 0, lowrank_bits: int = 16) -> list[str]:
    """The names of the configs a user most likely means, at one rank: the built-in spaces'
    (``lqlora`` and ``default``), LQ-LoRA's grid in the integer family too, and fp16-scale
    configs of both families at the usual blocks 16..128."""
    plain = [QuantConfig(family=f, bits=b, block=g, scale_bits=16)
             for f in FAMILIES for b in NF_BITS for g in (16, 32, 64, 128)]
    configs = (_expand_grid(dict(LQLORA_GRID, family=FAMILIES), (rank,))
               + [QuantConfig.from_name(c, allow_unusual=True).replace(rank=rank) for c in DEFAULT_CONFIGS]
               + [c.replace(rank=rank) for c in plain])
    if rank and lowrank_bits != 16:
        configs = [c.replace(lowrank_bits=lowrank_bits) for c in configs]
    return [c.name for c in _unique(configs)]


def nearest_config_names(name: str, cfg: QuantConfig | None = None, n: int = 3) -> list[str]:
    """Up to ``n`` known config names closest to ``name`` (difflib), at ``cfg``'s rank when given."""
    rank, lowrank_bits = (cfg.rank, cfg.lowrank_bits) if cfg is not None else (0, 16)
    return difflib.get_close_matches(name, known_config_names(rank, lowrank_bits), n=n, cutoff=0.5)


def check_usual(cfg: QuantConfig, *, spelled: str | None = None) -> QuantConfig:
    """``cfg`` if usual, else ValueError naming why, the nearest known names and the flag that allows it."""
    reasons = unusual_reasons(cfg)
    if not reasons:
        return cfg
    shown = spelled or cfg.name
    near = nearest_config_names(shown, cfg)
    hint = f"; did you mean {' or '.join(repr(c) for c in near)}?" if near else ""
    raise ValueError(f"unusual config {shown!r}: {'; '.join(reasons)}{hint} ({ALLOW_UNUSUAL_HINT})")


def check_fits(cfg: QuantConfig, rows: int, cols: int, *, what: str = "the matrix", block: bool = True) -> None:
    """ValueError when ``cfg`` does not fit a rows x cols matrix: a block longer than a row
    (``cols``; checked when ``block``), or a rank above the smaller side."""
    _check_shape(rows, cols)
    if block and cfg.block > cols:
        raise ValueError(f"{what} ({rows}x{cols}): block {cfg.block} of {cfg.name} is longer than its rows "
                         f"({cols} columns); choose a block of at most {cols}")
    if cfg.rank > min(rows, cols):
        raise ValueError(f"{what} ({rows}x{cols}): rank {cfg.rank} of {cfg.name} exceeds its smaller side "
                         f"{min(rows, cols)}")


def _check_shape(rows: int, cols: int) -> None:
    ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (rows, cols))
    if not ok or rows < 1 or cols < 1:
        raise ValueError(f"a matrix shape must be two positive ints, got ({rows}, {cols})")


# ----- config spaces ---------------------------------------------------------------------

LQLORA_GRID: dict[str, Sequence[Any]] = {
    "bits": (2, 3, 4, 8),
    "scale_bits": (2, 3, 4, 8),
    "scale_dtype": ("fp16", "fp32"),
    "block": (16, 32, 64),
    "scale_block": (16, 64, 256),
}

#: The cheaper default space, chosen by measurement (``bench/default_space.py --pool families``,
#: results in ``reports/default_space/families/``): greedy forward selection over the union of
#: both families (the NF configs the same selection picks from LQ-LoRA's grid, NF with fp16
#: scales, and int2/3/4/8 at blocks 16-128 with six scale options) on the rank-0 Fisher and
#: plain errors of 5 of the built-in model's 30 layers, in the order picked. Its exact optimum is
#: 0.76-0.997x the NF-only space's at every budget from 2.25 to 4.5 bits/param (Fisher: 0.83-0.99),
#: at 0.92x its rank-0 profiling cost; the NF-only space is within 1.7% of `lqlora`'s optimum
#: (``reports/default_space/results.md``). Rank-0 names: the rank comes from ``ranks``.
DEFAULT_CONFIGS: tuple[str, ...] = (
    "nf4-g64-s3x64-r0", "nf3-g16-s4x256-r0", "nf4-g32-s4x64-r0", "int2-g16-s2x16-r0",
    "nf8-g32-s8x16-r0", "int2-g64-s3x64-r0", "nf3-g16-s3x64-r0", "nf4-g16-s4x64-r0",
    "nf3-g32-s4x64-r0", "int4-g16-s8x256-r0", "nf3-g32-s3x64-r0", "int4-g16-s4x64-r0",
    "int2-g16-s3x64-r0", "int8-g128-s16-r0", "nf4-g16-s2x64-r0", "nf4-g16-s4x16-r0",
    "int2-g32-s3x64-r0", "nf4-g16-s3x16-r0", "nf8-g64-s3x16-r0", "int3-g16-s4x64-r0",
    "nf8-g64-s8x16-r0", "int4-g32-s4x64-r0",
)

_GRID_FIELDS = ("family", "bits", "block", "scale_bits", "scale_block", "scale_dtype", "rank", "lowrank_bits")
BUILTIN_SPACES: dict[str, Any] = {"lqlora": LQLORA_GRID, "default": DEFAULT_CONFIGS}


def _expand_grid(grid: dict[str, Sequence[Any]], ranks: Iterable[int]) -> list[QuantConfig]:
    grid = dict(grid)
    grid.setdefault("rank", tuple(ranks))
    unknown = set(grid) - set(_GRID_FIELDS)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; known: {list(_GRID_FIELDS)}")
    keys = [k for k in _GRID_FIELDS if k in grid]
    values = []
    for k in keys:
        v = grid[k]
        v = [v] if isinstance(v, (int, str)) else list(v)
        if not v:
            raise ValueError(f"config field {k!r} has an empty list of values")
        values.append(v)
    return _unique(QuantConfig(**dict(zip(keys, combo))) for combo in itertools.product(*values))


def _unique(configs: Iterable[QuantConfig]) -> list[QuantConfig]:
    seen: dict[str, QuantConfig] = {}
    for cfg in configs:
        seen.setdefault(cfg.name, cfg)
    return list(seen.values())


_HAS_RANK = re.compile(r"-r\d+(-lr8)?$")


def read_space_file(path: Path, what: str = "config space file") -> Any:
    """The JSON (or, by suffix, YAML) content of a config space file; ValueError naming ``what``
    and the file when it does not parse."""
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f"{what} {path} is not valid JSON/YAML: {exc}") from exc


def _load_space_file(path: Path, ranks: Sequence[int], allow_unusual: bool) -> list[QuantConfig]:
    data = read_space_file(path)
    if isinstance(data, dict) and "configs" in data:
        data = data["configs"]
    if isinstance(data, dict):
        configs = _expand_grid(data, ranks)
    elif isinstance(data, list):
        configs = []
        for item in data:
            if isinstance(item, str) and not _HAS_RANK.search(item.strip()):
                # a name without -r{rank}: one config per rank of `ranks`
                head, lr8 = (item.strip()[:-4], "-lr8") if item.strip().endswith("-lr8") else (item.strip(), "")
                for r in ranks:
                    name = f"{head}-r{r}{lr8 if r else ''}"
                    try:
                        configs.append(QuantConfig.from_name(name, allow_unusual=allow_unusual))
                    except ValueError as exc:  # name the entry as the file spells it
                        raise ValueError(f"config space file {path}: "
                                         + str(exc).replace(repr(name), repr(item), 1)) from None
            elif isinstance(item, str):
                try:
                    configs.append(QuantConfig.from_name(item, allow_unusual=allow_unusual))
                except ValueError as exc:
                    raise ValueError(f"config space file {path}: {exc}") from None
            elif isinstance(item, dict):
                configs.append(QuantConfig(**item))
            else:
                raise ValueError(f"config space file {path}: entry {item!r} is not a name or a dict")
        configs = _unique(configs)
    else:
        raise ValueError(
            f"config space file {path} must hold a list of config names/dicts or a grid "
            "dict like {\"bits\": [2, 3, 4], \"block\": [64], ...}"
        )
    if not configs:
        raise ValueError(f"config space file {path} defines no configs; add at least one")
    if not allow_unusual:
        for cfg in configs:
            try:
                check_usual(cfg)
            except ValueError as exc:
                raise ValueError(f"config space file {path}: {exc}") from None
    return configs


def config_space(name: str | Path = "default", ranks: Sequence[int] = (64,), *,
                 allow_unusual: bool = False) -> list[QuantConfig]:
    """The configs of a space: ``"lqlora"`` (288 per rank), ``"default"`` (22 per rank), or a JSON/YAML file.

    A file holds either a list of config names (``["nf4-g64-s8x256-r0", ...]``; a name without
    ``-r{rank}``, like ``"nf4-g64-s8x256"``, takes each rank of ``ranks``) or dicts,
    or a grid ``{"bits": [...], "block": [...], ...}`` expanded as a product; a grid without
    ``rank`` takes ``ranks``. A file's unusual configs (:func:`unusual_reasons`) are refused
    unless ``allow_unusual``.
    """
    ranks = tuple(int(r) for r in ranks)
    if not ranks:
        raise ValueError("ranks must name at least one rank (0 = no low-rank part)")
    if any(r < 0 for r in ranks):
        raise ValueError(f"ranks must be >= 0, got {ranks}")
    key = str(name)
    if key in BUILTIN_SPACES:
        space = BUILTIN_SPACES[key]
        if isinstance(space, dict):
            return _expand_grid(space, ranks)
        return _unique(QuantConfig.from_name(c).replace(rank=r) for c in space for r in ranks)
    path = Path(key)
    if path.is_file():
        return _load_space_file(path, ranks, allow_unusual)
    raise ValueError(
        f"unknown config space {key!r}: use one of {sorted(BUILTIN_SPACES)} or a path to a "
        "JSON/YAML file"
    )


#: ``--ranks auto``: rank 0 plus the largest power-of-two rank whose bf16 factors cost at most
#: this many bits per parameter on the median target (LQ-LoRA's rank 64 on 4096x4096 costs 0.5).
AUTO_FACTOR_BITS = 0.5
AUTO_MAX_RANK = 64


def auto_ranks(shapes: Sequence[tuple[int, int]], factor_bits: float = AUTO_FACTOR_BITS) -> tuple[int, ...]:
    """``(0, r)`` for ``--ranks auto``: r the largest power of two (at most 64) whose bf16 factors
    cost at most ``factor_bits`` bits/param on the median target shape; ``(0,)`` if below 4.

    SmolLM2-135M (576-wide) gets (0, 8); a 7B model's 4096x4096 matrices get (0, 64).
    """
    if not shapes:
        raise ValueError("auto ranks need at least one target shape")
    limits = sorted(rows * cols * factor_bits / (16.0 * (rows + cols)) for rows, cols in shapes)
    limit = limits[(len(limits) - 1) // 2]
    rank = 1
    while rank * 2 <= min(limit, AUTO_MAX_RANK):
        rank *= 2
    return (0,) if rank < 4 else (0, rank)


def parse_ranks(text: str) -> tuple[int, ...] | str:
    """Parse ``"64"`` or ``"0,16,64"`` into a tuple of ranks; ``"auto"`` stays ``"auto"``
    (resolved against the targets' shapes by :func:`resolve_ranks`)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        ranks = tuple(int(t) for t in str(text).split(",") if t.strip() != "")
    except ValueError:
        raise ValueError(f"invalid --ranks {text!r}: expected 'auto' or comma-separated ints like 0,16,64")
    if not ranks or any(r < 0 for r in ranks):
        raise ValueError(f"invalid --ranks {text!r}: expected 'auto' or non-negative ints like 0,16,64")
    return ranks


def resolve_ranks(ranks: Sequence[int] | str, shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """The ranks to profile: ``ranks`` as ints, or :func:`auto_ranks` of ``shapes`` for ``"auto"``."""
    if isinstance(ranks, str):
        parsed = parse_ranks(ranks)
        return auto_ranks(shapes) if parsed == "auto" else parsed
    return tuple(int(r) for r in ranks)
