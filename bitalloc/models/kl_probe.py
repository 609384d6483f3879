"""Measured damage: the KL to the original model when some target weights are replaced.

:class:`KLProbe` runs a causal LM once on fixed token windows, keeping the reference
next-token log-probabilities and the hidden states entering each decoder block (the
``nn.ModuleList`` holding the targets, found by structure, not by name). A probe with some
targets replaced then starts at the first block they sit in: the blocks before it return the
kept hidden state, so a probe of the last layer costs one block and the output head.
``probe.kl({name: W'})`` is the mean over all positions of ``KL(P_ref || P')``.

:meth:`KLProbe.at` moves the operating point: inside it, a set of weights (an allocation's
``Q + L1·L2``) stays installed and the kept block inputs are those of that model, so probes
measure the change around it; the reference stays the original model.

:func:`fit_kl_factors` calibrates the KL-weighted error of a profile: for every target, noise
of a controlled relative size in a basis error (``error_act``'s ``tr(E H Eᵀ)`` where the
input moments are known, else the Fisher-weighted or plain squared error) is injected at a few
levels, the KL measured, and one factor ``α`` fitted through the origin (least squares), so
that ``error_kl = α · error_basis``. Cost: one probe per target and level, each from the
target's block on ``windows`` calibration sequences.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bitalloc.models.activations import act_error
from bitalloc.models.causal import eval_mode
from bitalloc.models.targets import set_target_weight, target_weight

log = logging.getLogger(__name__)

#: Positions whose log-probabilities are formed at once (vocabulary x this many floats).
POSITION_CHUNK = 256
BASES = ("act", "fisher", "plain")


@dataclass(frozen=True)
class ProbeSettings:
    """How the per-matrix KL factors are measured.

    ``windows``: calibration sequences the KL is taken on (the first ones of the profile's
    calibration text); ``levels``: relative basis errors of the injected noise (``0.01``: the
    noise's basis error is 1% of the weight's own, ``tr(W H Wᵀ)`` for ``act``; about what NF4
    gives); ``seed``: of the noise. Cost grows with ``windows × len(levels)``.
    """

    windows: int = 1
    levels: tuple[float, ...] = (0.04,)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 1:
            raise ValueError(f"KL probe windows must be a positive integer, got {self.windows!r}")
        levels = tuple(float(x) for x in self.levels)
        if not levels or any(not math.isfinite(x) or x <= 0 for x in levels):
            raise ValueError(f"KL probe levels must be positive relative errors, got {self.levels!r}")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "seed", int(self.seed))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"windows": self.windows, "levels": list(self.levels), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeSettings:
        """Read :meth:`to_dict`'s form."""
        return cls(windows=int(data["windows"]), levels=tuple(data["levels"]), seed=int(data.get("seed", 0)))


def find_blocks(model: torch.nn.Module, names: Sequence[str]) -> tuple[torch.nn.ModuleList, dict[str, int]]:
    """The ``nn.ModuleList`` of decoder blocks holding the most of ``names``, and each name's block index.

    A target outside every block (none in a decoder LM) gets index 0: a probe of it runs the whole model.
    """
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for qual, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            prefix = f"{qual}." if qual else ""
            held = sum(1 for n in names if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit())
            if held and (best is None or held > best[0]):
                best = (held, prefix, module)
    if best is None:
        raise ValueError("no list of blocks holds the targets; the KL probe needs a decoder with a layer list")
    _, prefix, blocks = best
    index = {}
    for n in names:
        head = n[len(prefix):].split(".")[0] if n.startswith(prefix) else ""
        index[n] = int(head) if head.isdigit() else 0
    return blocks, index


class _Replay(torch.nn.Module):
    """Stands in for a skipped block: returns the kept hidden state in the block's output form."""

    def __init__(self, hidden: torch.Tensor, tuple_len: int) -> None:
        super().__init__()
        self.hidden, self.tuple_len = hidden, tuple_len

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.tuple_len:
            return (self.hidden,) + (None,) * (self.tuple_len - 1)
        return self.hidden


def _hidden_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ValueError("a decoder block was called without its hidden states")
    return hidden


class KLProbe:
    """KL to the original model on fixed windows when some targets' weights are replaced.

    ``tokens``: ``LongTensor[n, seqlen]`` (all windows run as one batch); ``targets``: the
    ``(name, module)`` pairs that may be replaced. ``device`` None runs where the model is.
    """

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, targets: Sequence[tuple[str, torch.nn.Module]],
                 *, device: str | torch.device | None = None) -> None:
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"KL probe tokens must be LongTensor[n, seqlen >= 2], got shape {tuple(tokens.shape)}")
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if next(model.parameters()).device != self.device:
            model.to(self.device)
        self.tokens = tokens.long().to(self.device)
        self.modules = dict(targets)
        self.blocks, self.block_of = find_blocks(model, list(self.modules))
        self.runs = 0
        self.inputs, self.tuple_len = self._capture()
        with torch.no_grad(), eval_mode(model):
            logits = model(input_ids=self.tokens, use_cache=False).logits
        self.ref_logits = logits.reshape(-1, logits.shape[-1]).float()

    @property
    def positions(self) -> int:
        """Positions each KL is the mean over."""
        return int(self.tokens.numel())

    @torch.no_grad()
    def _capture(self) -> tuple[list[torch.Tensor], int]:
        """The hidden states entering every block (and whether blocks return tuples), from one forward pass."""
        inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        shape = {"tuple_len": 0}

        def pre(k: int) -> Callable[..., None]:
            def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                inputs[k] = _hidden_of(args, kwargs).detach().clone()
            return hook

        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            shape["tuple_len"] = len(output) if isinstance(output, tuple) else 0

        handles = [b.register_forward_pre_hook(pre(k), with_kwargs=True) for k, b in enumerate(self.blocks)]
        handles.append(self.blocks[0].register_forward_hook(post))
        try:
            with eval_mode(self.model):
                self.model(input_ids=self.tokens, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in inputs):
            raise ValueError("some decoder blocks were not called; the KL probe cannot start at them")
        return [x for x in inputs if x is not None], shape["tuple_len"]

    @contextlib.contextmanager
    def _replaced(self, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
        unknown = [n for n in weights if n not in self.modules]
        if unknown:
            raise KeyError(f"not a target of this probe: {unknown[0]}")
        saved = {n: target_weight(self.modules[n]).detach().clone() for n in weights}
        try:
            for n, w in weights.items():
                set_target_weight(self.modules[n], w)
            yield
        finally:
            for n, w in saved.items():
                set_target_weight(self.modules[n], w)

    @torch.no_grad()
    def kl(self, weights: Mapping[str, torch.Tensor]) -> float:
        """Mean ``KL(P_original || P')`` per position with ``weights`` (``{target: (out, in) tensor}``)
        in place of the current ones; the model is left as it was."""
        start = min((self.block_of[n] for n in weights), default=len(self.blocks))
        with self._replaced(weights), eval_mode(self.model):
            logits = self._run_from(start)
        self.runs += 1
        # in float64 from both sets of logits: float32 log-probabilities would leave a noise floor
        # (about 1e-8 per position) above the KL of small perturbations
        total = 0.0
        flat = logits.reshape(-1, logits.shape[-1])
        for s in range(0, len(flat), POSITION_CHUNK):
            logp = F.log_softmax(self.ref_logits[s:s + POSITION_CHUNK].double(), dim=-1)
            logq = F.log_softmax(flat[s:s + POSITION_CHUNK].double(), dim=-1)
            total += float((logp.exp() * (logp - logq)).sum())
        return total / self.positions

    def _run_from(self, start: int) -> torch.Tensor:
        """Logits of the current model, the blocks before ``start`` replayed from the kept inputs."""
        if start <= 0 or start >= len(self.blocks):
            return self.model(input_ids=self.tokens, use_cache=False).logits
        originals = [self.blocks[k] for k in range(start)]
        replay = _Replay(self.inputs[start], self.tuple_len)
        try:
            for k in range(start):
                self.blocks[k] = replay
            return self.model(input_ids=self.tokens, use_cache=False).logits
        finally:
            for k, block in enumerate(originals):
                self.blocks[k] = block

    @contextlib.contextmanager
    def at(self, weights: Mapping[str, torch.Tensor]) -> Iterator[KLProbe]:
        """Probe around another operating point: ``weights`` stay installed inside the block and the
        kept block inputs are that model's (the reference stays the original)."""
        kept = self.inputs
        with self._replaced(weights):
            self.inputs, _ = self._capture()
            try:
                yield self
            finally:
                self.inputs = kept


def basis_error(delta: torch.Tensor, *, H: torch.Tensor | None = None, fisher: torch.Tensor | None = None) -> float:
    """The error a KL factor multiplies: ``tr(ΔW H ΔWᵀ)`` with ``H``, else ``Σ F ΔW²``, else ``‖ΔW‖²``."""
    if H is not None:
        return act_error(delta, H)
    d = delta.double()
    if fisher is not None:
        return float((fisher.to(device=d.device, dtype=torch.float64) * d.square()).sum())
    return float(d.square().sum())


def probe_noise(W: torch.Tensor, level: float, generator: torch.Generator, error: Callable[[torch.Tensor], float]
                ) -> tuple[torch.Tensor, float]:
    """Gaussian noise scaled per row by the row's RMS (as block-scaled quantization errors are), rescaled
    so that ``error(noise) = level · error(W)``; returns ``(noise, error(noise))``."""
    rms = W.float().square().mean(dim=1, keepdim=True).sqrt()
    noise = torch.randn(W.shape, generator=generator).to(W.device) * rms
    scale = math.sqrt(level * error(W) / max(error(noise), 1e-300))
    noise = noise * scale
    return noise, error(noise)


def fit_kl_factors(probe: KLProbe, targets: Sequence[str], settings: ProbeSettings,
                   error: Callable[[str, torch.Tensor], float], *, progress: bool = True
                   ) -> dict[str, dict[str, Any]]:
    """Per target, the factor ``α`` with ``KL ≈ α · error(name, ΔW)``, fitted through the origin over
    ``settings.levels`` of injected noise. Returns ``{name: {"factor", "levels", "errors", "kl"}}``."""
    out: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in tqdm(targets, desc="KL probes", unit="matrix", disable=not progress):
        # seeded by the matrix's name: its factor does not depend on which others are measured with it
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + zlib.crc32(name.encode()))
        W = target_weight(probe.modules[name]).detach().float()
        errors, kls = [], []
        for level in settings.levels:
            noise, err = probe_noise(W, level, gen, lambda d: error(name, d))
            kls.append(probe.kl({name: W + noise}))
            errors.append(err)
        den = sum(e * e for e in errors)
        factor = sum(e * k for e, k in zip(errors, kls)) / den if den > 0 else 0.0
        out[name] = {"factor": max(factor, 0.0), "levels": list(settings.levels), "errors": errors, "kl": kls}
    log.info("KL factors of %d targets in %.1f s (%d probes)", len(targets), time.perf_counter() - started,
             len(targets) * len(settings.levels))
    return out
