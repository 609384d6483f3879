"""``bitalloc apply``: decompose every target with its chosen config and write the model directory.

The directory is built in a temporary sibling (``.DIR.tmp-HOST.PID.*``; those of killed runs
are removed by the next run) and renamed into place only when every file is written, so an
interrupted or failed run (disk full, Ctrl-C, a bad matrix) leaves no directory that
:func:`bitalloc.load` accepts. Targets are processed one at a
time on the device; each target's full-precision weight is released once it is quantized, so
the model is never held twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from bitalloc import __version__
from bitalloc.allocation import Allocation
from bitalloc.atomic import atomic_write_json, check_output, locked_output, make_temp_dir, permit_tree
from bitalloc.configs import QuantConfig, check_fits
from bitalloc.errors import InputError
from bitalloc.apply.layout import (ADAPTER_DIR, DEQUANTIZED_DIR, FORMAT, FORMAT_VERSION, INFO_FILE, MODEL_FILE,
                                   factor_key, file_digests, file_sizes, is_applied_dir, q_key)
from bitalloc.apply.peft_adapter import task_type_for, write_adapter
from bitalloc.identity import BUILTIN_ALIAS, model_fingerprint, model_id
from bitalloc.preflight import check_model_spec
from bitalloc.lowrank import decompose
from bitalloc.models import Calibration, calibration_fisher, find_targets, load_model, resolve_device, target_weight
from bitalloc.models.hub import ModelNotFoundError, looks_like_hub_id
from bitalloc.models.targets import TARGET_TYPES, float_target_weight

log = logging.getLogger(__name__)

__all__ = ["apply_allocation"]


def _assignments(allocation: Any, uniform: str | None,
                 allow_unusual: bool = False) -> tuple[dict[str, str] | None, dict[str, Any]]:
    """(name -> config name or None for "every target", allocation header) from the inputs.

    A ``uniform`` name is a user's: an unusual one is refused unless ``allow_unusual``. An
    allocation's names come from its profile, checked when it was made.
    """
    if (allocation is None) == (uniform is None):
        raise ValueError("give either an allocation (ALLOC.json) or --uniform CONFIG, not both and not neither")
    if uniform is not None:
        cfg = QuantConfig.from_name(uniform, allow_unusual=allow_unusual)
        return None, {"uniform": cfg.name}
    if isinstance(allocation, (str, os.PathLike)):
        source = os.fspath(allocation)
        allocation = Allocation.load(allocation)
    else:
        source = None
    data = allocation.to_dict() if isinstance(allocation, Allocation) else dict(allocation)
    if not isinstance(data.get("assignments"), dict) or not data["assignments"]:
        raise ValueError("the allocation has no assignments (matrix -> config); make one with `bitalloc solve`")
    for name, config in data["assignments"].items():
        QuantConfig.from_name(config, allow_unusual=True)  # clear error for a bad config name
    header = {k: data.get(k) for k in ("budget", "bits_per_param", "objective", "objective_column", "status",
                                       "gap", "backend", "profile", "exclude_lowrank_from_budget")}
    header["provenance"] = data.get("provenance", {})
    header["path"] = source
    return dict(data["assignments"]), header


def _model_targets(model: torch.nn.Module, assignments: dict[str, str] | None, header: Mapping[str, Any],
                   include: Any, exclude: Any, another_model: bool = False) -> list[str]:
    """The names of the targets ``apply`` must cover: the model's targets as its profile found them
    (the allocation's recorded include/exclude), or as ``include``/``exclude`` find them for --uniform.

    An allocation that does not record them (an older bitalloc's) covers its profile's targets on
    the model it was made for; on ``another_model`` (--ignore-model-hash) every target the model has
    by the default rule must be covered too, so that no new layer stays dense unnoticed."""
    if assignments is None:
        return [n for n, _ in find_targets(model, include=include, exclude=exclude)]
    provenance = header.get("provenance", {})
    if "include" in provenance or "exclude" in provenance:
        return [n for n, _ in find_targets(model, include=provenance.get("include"), exclude=provenance.get("exclude"))]
    profiled = list(provenance.get("shapes") or assignments)
    if not another_model:
        log.warning("the allocation does not record its profile's include/exclude (an older bitalloc made it): "
                    "applying it to the %d targets its profile had", len(profiled))
        return profiled
    names = list(dict.fromkeys(profiled + [n for n, _ in find_targets(model)]))
    log.warning("the allocation does not record its profile's include/exclude (an older bitalloc made it) and the "
                "model differs from the profiled one: each of its %d targets needs a config or --keep-dense "
                "(the allocation has %d)", len(names), len(assignments))
    return names


def _dense_targets(names: list[str], assignments: dict[str, str] | None, keep_dense: Any) -> list[str]:
    """The targets kept dense: those ``keep_dense`` names; refuses targets the allocation leaves without a config."""
    keep = re.compile(keep_dense) if isinstance(keep_dense, str) else keep_dense
    dense = [n for n in names if keep is not None and keep.search(n)]
    uncovered = [n for n in names if assignments is not None and n not in assignments and n not in dense]
    if uncovered:
        raise InputError(
            f"the allocation gives no config to {len(uncovered)} target(s) of this model: "
            f"{', '.join(uncovered[:5])}{' ...' if len(uncovered) > 5 else ''}; solve a profile that covers them, "
            "or keep them dense with --keep-dense REGEX (counted at their stored bits)"
        )
    if keep is not None and not dense:
        raise InputError(f"--keep-dense {keep.pattern!r} matches no target of this model")
    return dense


def _targets_for(model: torch.nn.Module, assignments: dict[str, str] | None, header: Mapping[str, Any],
                 include: Any, exclude: Any) -> list[tuple[str, torch.nn.Module, QuantConfig]]:
    if assignments is None:
        cfg = QuantConfig.from_name(header["uniform"], allow_unusual=True)
        return [(n, m, cfg) for n, m in find_targets(model, include=include, exclude=exclude)]
    modules = dict(model.named_modules())
    missing = [n for n in assignments if n not in modules or not isinstance(modules[n], TARGET_TYPES)]
    if missing:
        have = [n for n, m in modules.items() if isinstance(m, TARGET_TYPES)][:5]
        raise ValueError(
            f"the allocation names {len(missing)} matrices this model does not have as Linear/Conv1D layers "
            f"(e.g. {missing[:3]}; the model has e.g. {have}): it was made for another model; "
            "profile and solve this model, or pass the right --model"
        )
    shapes = header.get("provenance", {}).get("shapes") or {}
    out = []
    for name, config in assignments.items():
        module = modules[name]
        shape = list(target_weight(module).shape)
        if name in shapes and list(shapes[name]) != shape:
            raise ValueError(f"matrix {name} is {shape[0]}x{shape[1]} in this model but {shapes[name][0]}x"
                             f"{shapes[name][1]} in the allocation's profile: the allocation is for another model")
        out.append((name, module, QuantConfig.from_name(config, allow_unusual=True)))
    return out


def _sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, so the same tensors give the same
    bytes (safetensors writes the metadata map in a per-process random order); same header length."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:  # never: the same entries in another order
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def _check_recorded_model(spec: str | None) -> None:
    """Say which model an allocation's provenance makes ``apply`` load; refuse a local path that is gone."""
    log.info("no model given: quantizing %s, the model the allocation was made for", spec or BUILTIN_ALIAS)
    if not spec or spec.strip().lower() == BUILTIN_ALIAS:
        return
    local = spec.startswith((".", "~", "/")) or not looks_like_hub_id(spec)
    if local and not Path(spec).expanduser().exists():
        raise ModelNotFoundError(f"the allocation was made for model {spec!r}, which does not exist here "
                                 "(no --model given): pass the model to quantize with --model")


def _shared_parameter_ids(model: torch.nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _non_target_tensors(model: torch.nn.Module, target_names: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every non-target tensor of the state dict, tied ones stored once; and alias -> stored name."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module in target_names:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and ident in first_by_storage:
            tied[key] = first_by_storage[ident]
            continue
        first_by_storage[ident] = key
        tensors[key] = value.detach().cpu().contiguous()
    return tensors, tied


def _fisher(model, tokenizer, targets, provenance: Mapping[str, Any], model_hash: str, device, progress):
    """The profile's Fisher estimate (its cache key is the profile's: provenance model and hash)."""
    calibration = provenance.get("calibration")
    if not provenance.get("fisher") or not calibration:
        return None
    return calibration_fisher(model, tokenizer, [(n, m) for n, m, _ in targets], Calibration.from_dict(calibration),
                              model_id=model_id(provenance.get("model")),
                              model_hash=provenance.get("model_hash") or model_hash,
                              seed=int(provenance.get("seed") or 0), device=device, progress=progress)


def _rename_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@locked_output("out")  # .OUT.lock next to out: one apply per output at a time
def apply_allocation(
    allocation: Allocation | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    model: str | None = None,
    uniform: str | None = None,
    include: Any = None,
    exclude: Any = None,
    dequantized: bool = False,
    device: str = "auto",
    fisher: bool | None = None,
    force: bool = False,
    ignore_model_hash: bool = False,
    keep_dense: str | re.Pattern[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    allow_unusual_config: bool = False,
) -> Path:
    """Quantize a model as an allocation (or ``uniform`` config name) says and write ``out``.

    ``model`` defaults to the allocation's model. Each target is decomposed ``Q + L1 L2`` with
    its config (Fisher-weighted when the allocation came from a Fisher profile and ``fisher``
    is not False; the profile's cached estimate is reused). ``include``/``exclude`` filter the
    targets of a ``uniform`` run; an allocation's targets are its profile's (found with the
    profile's include/exclude), and every one must have a config. ``keep_dense`` (a regex) keeps
    the matching targets dense, whatever the allocation says; they are stored as in the source
    model and counted at their stored bits in ``bits_per_param`` (``dense_targets`` in
    ``bitalloc.json``). Returns the directory. Raises ValueError (InputError) for an allocation
    made for another model or one leaving targets without a config, a ``uniform`` config that
    is unusual (unless ``allow_unusual_config``) or does not fit a target, OutputExistsError (a
    FileExistsError) for a non-empty ``out`` without ``force``.
    """
    started = time.perf_counter()
    assignments, header = _assignments(allocation, uniform, allow_unusual_config)
    if assignments is not None and (include is not None or exclude is not None):
        raise InputError("--include/--exclude choose the targets of --uniform; an allocation applies to the targets "
                         "its profile found: to keep some of them dense, pass --keep-dense REGEX")
    out = Path(out)
    check_output(out, force=force, kind="dir", what="--out")
    provenance = header.get("provenance", {})
    spec = model if model is not None else provenance.get("model")
    if model is None and assignments is not None:
        _check_recorded_model(spec)
    if spec is not None and is_applied_dir(spec):
        raise ValueError(f"{spec} is a `bitalloc apply` output, not a model to quantize; pass the model it was "
                         "made from (its bitalloc.json names it under 'model')")
    check_model_spec(spec, flag="--model")
    dev = resolve_device(device)
    net, tokenizer = load_model(spec, dtype="auto")
    model_hash = model_fingerprint(net)
    targets = _targets_for(net, assignments, header, include, exclude)  # refuses an allocation for another model
    another_model = bool(provenance.get("model_hash")) and provenance["model_hash"] != model_hash
    dense = set(_dense_targets(_model_targets(net, assignments, header, include, exclude, another_model), assignments,
                               keep_dense))
    targets = [t for t in targets if t[0] not in dense]
    modules = dict(net.named_modules())
    dense_details = {}
    for name in sorted(dense, key=list(modules).index):
        weight = target_weight(modules[name])
        dense_details[name] = {"rows": int(weight.shape[0]), "cols": int(weight.shape[1]),
                               "dtype": str(weight.dtype).removeprefix("torch."),
                               "storage_bits": int(weight.numel() * weight.element_size() * 8)}
    if dense:
        log.warning("keeping %d target(s) dense, counted at their stored bits: %s", len(dense),
                    ", ".join(list(dense_details)[:5]) + (" ..." if len(dense) > 5 else ""))
    if assignments is not None and provenance.get("model_hash") and provenance["model_hash"] != model_hash \
            and not ignore_model_hash:
        raise ValueError(
            f"the allocation was made for model {provenance.get('model')!r} (hash {provenance['model_hash']}), "
            f"but {spec or 'the built-in model'!r} has hash {model_hash}: profile and solve this model, or pass "
            "--ignore-model-hash if its weights differ on purpose (e.g. a fine-tuned copy)"
        )
    for name, module, cfg in targets:
        rows, cols = target_weight(module).shape
        # a typed --uniform config must fit every row; an allocation's configs were profiled on these shapes
        check_fits(cfg, int(rows), int(cols), what=name, block=assignments is None)
    use_fisher = bool(provenance.get("fisher")) if fisher is None else bool(fisher)
    F = _fisher(net, tokenizer, targets, provenance, model_hash, dev, progress) if use_fisher and assignments is not None else None
    shared = _shared_parameter_ids(net)
    compute_dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        arrays: dict[str, torch.Tensor] = {}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        dense: dict[str, torch.Tensor] = {}
        details: dict[str, dict[str, Any]] = {}
        index_of = {name: i for i, (name, _, _) in enumerate(targets)}
        for name, module, cfg in tqdm(targets, desc="apply", unit="matrix", disable=not progress):
            W = float_target_weight(name, module, dev)
            t0 = time.perf_counter()
            dec = decompose(W, cfg, None if F is None else F[name].to(dev),
                            seed=seed * 100003 + index_of[name])
            for array, value in dec.q.arrays().items():
                arrays[q_key(name, array)] = value.detach().cpu().contiguous()
            q_bytes = dec.q.nbytes
            factor_bytes = 0
            if cfg.rank:
                if cfg.lowrank_bits == 8:
                    for factor, qt in (("l1t", dec.l1_q), ("l2", dec.l2_q)):
                        for array, value in qt.arrays().items():
                            arrays[factor_key(name, factor, array)] = value.detach().cpu().contiguous()
                    factor_bytes = dec.l1_q.nbytes + dec.l2_q.nbytes
                    factors[name] = (dec.l1.float().cpu(), dec.l2.float().cpu())
                else:  # bf16 factors are stored in the adapter, exactly (decompose rounds them)
                    factors[name] = (dec.l1.to(torch.bfloat16).cpu(), dec.l2.to(torch.bfloat16).cpu())
                    factor_bytes = sum(t.numel() * t.element_size() for t in factors[name])
            if dequantized:
                dense[name] = dec.q.dequantize().to(torch.bfloat16).cpu()
            rows, cols = W.shape
            details[name] = {
                "config": cfg.name, "rows": rows, "cols": cols, "type": type(module).__name__,
                "storage_bits": cfg.storage_bits(rows, cols), "bits_per_param": cfg.bits_per_param(rows, cols),
                "bytes": q_bytes + factor_bytes, "error": dec.error, "error_fisher": dec.error_fisher,
                "iterations": dec.iterations, "seconds": time.perf_counter() - t0,
            }
            if id(module.weight) not in shared:  # release the full-precision copy
                module.weight.data = torch.empty(0, dtype=module.weight.dtype)
            del W, dec

        target_names = {name for name, _, _ in targets}
        tensors, tied = _non_target_tensors(net, target_names)
        tensors.update(arrays)
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "bitalloc_format": FORMAT})
        _sort_header_metadata(tmp / MODEL_FILE)
        net.config.save_pretrained(tmp)
        if getattr(net, "generation_config", None) is not None and task_type_for(net):
            try:
                net.generation_config.save_pretrained(tmp)
            except (ValueError, OSError) as exc:  # an invalid generation config is not worth failing for
                log.warning("not writing generation_config.json: %s", exc)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        base = spec or getattr(net.config, "_name_or_path", "") or BUILTIN_ALIAS
        if dequantized:
            _write_dequantized(tmp / DEQUANTIZED_DIR, net, tensors, set(arrays), dense, targets, tokenizer)
            base = str((out / DEQUANTIZED_DIR).resolve())
        if factors:
            write_adapter(tmp / ADAPTER_DIR, factors, base_model=str(base), task_type=task_type_for(net))

        quantized_params = sum(d["rows"] * d["cols"] for d in details.values())
        dense_params = sum(d["rows"] * d["cols"] for d in dense_details.values())
        dense_bits = sum(d["storage_bits"] for d in dense_details.values())
        total_params = quantized_params + dense_params
        dense_keys = {f"{name}.weight" for name in dense_details}
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bitalloc_version": __version__,
            "model": model_id(spec),
            "model_hash": model_hash,
            "model_class": type(net).__name__,
            "dtype": str(compute_dtype).removeprefix("torch."),
            "bits_per_param": (sum(d["storage_bits"] for d in details.values()) + dense_bits) / total_params,
            "bits_per_param_on_disk": (8 * sum(d["bytes"] for d in details.values()) + dense_bits) / total_params,
            "target_params": total_params,
            "non_target_params": sum(t.numel() for k, t in tensors.items() if k not in arrays and k not in dense_keys),
            "non_target_bytes": sum(t.numel() * t.element_size() for k, t in tensors.items()
                                    if k not in arrays and k not in dense_keys),
            "targets": {name: d["config"] for name, d in details.items()},
            "target_details": details,
            "dense_targets": dense_details,
            "tied": tied,
            "fisher": F is not None,
            "adapter": bool(factors),
            "dequantized": bool(dequantized),
            "allocation": header,
            "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        permit_tree(tmp)
        info["files"] = file_sizes(tmp)
        info["sha256"] = file_digests(tmp)
        atomic_write_json(tmp / INFO_FILE, info)
        _rename_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("applied %d targets to %s: %.4f bits/param (%.1f s)", len(targets), out, info["bits_per_param"],
             info["seconds"])
    return out


def _write_dequantized(folder: Path, net: torch.nn.Module, tensors: Mapping[str, torch.Tensor], packed: set[str],
                       dense: Mapping[str, torch.Tensor], targets, tokenizer) -> None:
    """A plain Hugging Face checkpoint: non-targets as they are, each Q dequantized to bf16."""
    folder.mkdir(parents=True)
    plain = {k: v for k, v in tensors.items() if k not in packed}
    for name, module, _ in targets:
        weight = dense[name]
        plain[f"{name}.weight"] = weight.t().contiguous() if isinstance(module, Conv1D) else weight
    save_file(plain, str(folder / MODEL_FILE), metadata={"format": "pt"})
    net.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
