"""Writing quantized adapters as an allocation says, and loading them back as PEFT LoRA adapters.

Layout of ``bitalloc adapter apply ALLOC --out DIR``::

    DIR/
      adapters.json                    index: every adapter, its bits and the allocation's summary
      NAME/adapter_quant.safetensors   packed arrays, ``MODULE.{B,A}.{high,low}.{codes,scales,zeros}``
      NAME/adapter_quant.json          per module: config, shape, rank, storage bits, arrays
      NAME/peft/                       with --dequantized: a plain PEFT LoRA adapter directory

``B.high``/``A.high`` are the top-h components (affine RTN, fp16 scale and zero per group; B'
columns stored as lines), ``B.low``/``A.low`` the rest (sign bits, fp16 mean per group).
:func:`load_adapter` decodes them into a PEFT LoRA state with ``lora_B = B̂'``, ``lora_A = Â'``
and ``alpha = r`` (scale 1), so the adapted layer adds exactly ``ΔŴ = B̂'Â'``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from bitalloc.adapters.config import AdapterQuantConfig
from bitalloc.adapters.peft_io import AdapterError, LoraAdapter, read_adapter
from bitalloc.adapters.solve import AdapterAllocation
from bitalloc.adapters.split import quantize_module, svd_split
from bitalloc.apply.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, peft_key
from bitalloc.atomic import atomic_write_json
from bitalloc.quant.affine import AffineQuantized, BinaryQuantized

ADAPTER_FORMAT = "bitalloc-adapter"
ADAPTER_VERSION = 1
INDEX_FILE = "adapters.json"
PACKED_WEIGHTS = "adapter_quant.safetensors"
PACKED_INFO = "adapter_quant.json"
PEFT_DIR = "peft"


@dataclass(frozen=True)
class DequantizedAdapter:
    """A quantized adapter decoded to a standard PEFT LoRA adapter (scale 1 in every module).

    ``config`` is its ``adapter_config.json`` dict, ``state_dict`` its PEFT-keyed tensors
    (``base_model.model.MODULE.lora_{A,B}.weight``), ``factors`` maps a module to ``(B̂', Â')``.
    """

    name: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def delta(self, module: str) -> torch.Tensor:
        """``ΔŴ = B̂'Â'`` of one module (float32)."""
        b, a = self.factors[module]
        return b @ a

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write a plain PEFT adapter directory (``adapter_config.json`` + safetensors weights)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict.items()}, str(folder / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        atomic_write_json(folder / ADAPTER_CONFIG, self.config)
        return folder


def _source_adapters(alloc: AdapterAllocation, paths: Sequence[str] | None) -> dict[str, LoraAdapter]:
    """The allocation's adapters, read from their recorded paths (or ``paths``) and hash-checked."""
    recorded = {a["name"]: a for a in alloc.data.get("provenance", {}).get("adapters", [])}
    wanted = sorted({m.split("/", 1)[0] for m in alloc.assignments})
    given = {}
    for p in paths or []:
        adapter = read_adapter(p)
        given[adapter.name] = adapter
    out: dict[str, LoraAdapter] = {}
    for name in wanted:
        if name in given:
            adapter = given[name]
        elif name in recorded and recorded[name].get("path"):
            try:
                adapter = read_adapter(recorded[name]["path"], name=name)
            except AdapterError as exc:
                raise AdapterError(f"adapter {name!r} of the allocation cannot be read ({exc}); pass its directory with --adapters") from exc
        else:
            raise AdapterError(f"the allocation does not say where adapter {name!r} is; pass its directory with --adapters")
        expect = recorded.get(name, {}).get("sha256")
        if expect and adapter.sha256 != expect:
            raise AdapterError(
                f"adapter {name!r} at {adapter.path} is not the one profiled (its weights' sha256 differs); "
                "profile it again"
            )
        out[name] = adapter
    for name, adapter in out.items():
        have = {m.name for m in adapter.modules}
        assigned = {m.split("/", 1)[1] for m in alloc.assignments if m.split("/", 1)[0] == name}
        if have != assigned:
            odd = sorted(have ^ assigned)[:3]
            raise AdapterError(f"adapter {name!r} and the allocation disagree on its modules (e.g. {odd})")
    return out


def _pack(adapter: LoraAdapter, assignments: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    totals = {"storage_bits": 0, "code_bits": 0, "params": 0, "bytes": 0}
    for m in adapter.modules:
        cfg = AdapterQuantConfig.from_name(assignments[f"{adapter.name}/{m.name}"])
        split = svd_split(m.lora_a, m.lora_b, m.scale)
        parts = quantize_module(split.b[0], split.a[0], cfg)
        keys = []
        for part, q in parts.items():
            for array, tensor in q.arrays().items():
                key = f"{m.name}.{part}.{array}"
                tensors[key] = tensor.contiguous()
                keys.append(key)
        nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        info = {"config": cfg.name, "rows": m.rows, "cols": m.cols, "rank": m.rank,
                "storage_bits": cfg.storage_bits(m.rows, m.cols, m.rank),
                "code_bits": cfg.code_bits(m.rows, m.cols, m.rank), "params": m.rank * (m.rows + m.cols),
                "bytes": nbytes, "arrays": keys}
        modules[m.name] = info
        for k in totals:
            totals[k] += info[k]
    summary = {
        "format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION, "name": adapter.name,
        "base_model_name_or_path": adapter.base_model, "task_type": adapter.config.get("task_type"),
        "source": {"path": adapter.path, "sha256": adapter.sha256, "r": adapter.config.get("r"),
                   "lora_alpha": adapter.config.get("lora_alpha"), "use_rslora": bool(adapter.config.get("use_rslora"))},
        "weights": PACKED_WEIGHTS,
        **totals,
        "bits_per_param": totals["storage_bits"] / totals["params"],
        "bits_per_param_codes": totals["code_bits"] / totals["params"],
        "bits_per_param_on_disk": 8 * totals["bytes"] / totals["params"],
        "modules": modules,
    }
    return tensors, summary


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; choose a new directory or pass --force")


def apply_adapters(
    allocation: str | os.PathLike[str] | AdapterAllocation,
    out: str | os.PathLike[str],
    *,
    dequantized: bool = False,
    adapters: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Write every adapter of ``allocation`` packed into ``out`` (and as plain PEFT dirs with ``dequantized``).

    The adapters are read from the paths the allocation records (``adapters`` overrides them)
    and must hash as profiled. Everything is checked and written to a temporary folder first,
    so a failure leaves ``out`` untouched.
    """
    t0 = time.perf_counter()
    alloc = allocation if isinstance(allocation, AdapterAllocation) else AdapterAllocation.load(allocation)
    out = Path(out)
    _prepare_out(out, force)
    for name in alloc.assignments.values():
        AdapterQuantConfig.from_name(name)
    sources = _source_adapters(alloc, adapters)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        index = []
        for name, adapter in sources.items():
            tensors, summary = _pack(adapter, alloc.assignments)
            folder = tmp / name
            folder.mkdir()
            save_file(tensors, str(folder / PACKED_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
            atomic_write_json(folder / PACKED_INFO, summary)
            if dequantized:
                load_adapter(tmp, name).save_pretrained(folder / PEFT_DIR)
            index.append({k: summary[k] for k in ("name", "storage_bits", "code_bits", "params", "bytes",
                                                  "bits_per_param", "bits_per_param_codes")})
        params = sum(a["params"] for a in index)
        atomic_write_json(tmp / INDEX_FILE, {
            "format": "bitalloc-adapters", "format_version": ADAPTER_VERSION,
            "allocation": {k: alloc.data.get(k) for k in ("budget", "bits_per_param", "bits_per_param_codes",
                                                          "objective", "status", "mode", "variant", "profile")},
            "bits_per_param": sum(a["storage_bits"] for a in index) / params,
            "bits_per_param_codes": sum(a["code_bits"] for a in index) / params,
            "bytes": sum(a["bytes"] for a in index), "params": params, "dequantized": bool(dequantized),
            "seconds": time.perf_counter() - t0, "adapters": index,
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _decode(info: dict[str, Any], tensors: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = AdapterQuantConfig.from_name(info["config"])
    rows, cols, rank, h = info["rows"], info["cols"], info["rank"], cfg.high
    b = torch.zeros(rows, rank)
    a = torch.zeros(rank, cols)

    def arrays(part: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        try:
            return {n: tensors[f"{module}.{part}.{n}"] for n in names}
        except KeyError as exc:
            raise AdapterError(f"packed adapter lacks array {exc.args[0]!r}") from None

    if h:
        b[:, :h] = AffineQuantized.from_arrays(arrays("B.high", ("codes", "scales", "zeros")), (rows, h),
                                               torch.float32, cfg.bits, cfg.group, 0).dequantize()
        a[:h] = AffineQuantized.from_arrays(arrays("A.high", ("codes", "scales", "zeros")), (h, cols),
                                            torch.float32, cfg.bits, cfg.group, 1).dequantize()
    if cfg.low_bits and h < rank:
        b[:, h:] = BinaryQuantized.from_arrays(arrays("B.low", ("codes", "scales")), (rows, rank - h),
                                               torch.float32, cfg.group, 0).dequantize()
        a[h:] = BinaryQuantized.from_arrays(arrays("A.low", ("codes", "scales")), (rank - h, cols),
                                            torch.float32, cfg.group, 1).dequantize()
    return b, a


def load_adapter(directory: str | os.PathLike[str], name: str) -> DequantizedAdapter:
    """Decode adapter ``name`` of an ``apply`` output directory into a PEFT LoRA adapter state."""
    folder = Path(directory) / name
    info_path = folder / PACKED_INFO
    if not info_path.is_file():
        known = sorted(p.parent.name for p in Path(directory).glob(f"*/{PACKED_INFO}"))
        raise AdapterError(f"{directory} has no quantized adapter {name!r} (it has {known})")
    info = json.loads(info_path.read_text())
    if info.get("format") != ADAPTER_FORMAT or int(info.get("format_version", 0)) > ADAPTER_VERSION:
        raise AdapterError(f"{info_path} is not a bitalloc adapter this version reads")
    tensors = load_file(str(folder / info.get("weights", PACKED_WEIGHTS)))
    factors = {module: _decode(m, tensors, module) for module, m in info["modules"].items()}
    config = adapter_config(factors, base_model=info.get("base_model_name_or_path"), task_type=info.get("task_type"))
    state = {}
    for module, (b, a) in factors.items():
        state[peft_key(module, "lora_A")] = a
        state[peft_key(module, "lora_B")] = b
    return DequantizedAdapter(name=name, config=config, state_dict=state, factors=factors)

