"""The LQ-LoRA decomposition ``W ≈ Q + L1 @ L2`` (plain and Fisher-weighted).

``Q`` is ``bitalloc.quant.quantize``'d with the config's family (NF or integer codes) and (double-quantized)
block scales; ``L1`` (rows x r) and ``L2`` (r x cols) are a rank-r factorization stored as the
config says (bf16, or NF8 with ``lowrank_bits == 8``).

* :mod:`~bitalloc.lowrank.loop`: the alternating loop for one config, and :func:`decompose`;
* :mod:`~bitalloc.lowrank.rank_step`: the rank-r step (subspace iteration, exact or sketched
  SVD, the split bfloat16 target);
* :mod:`~bitalloc.lowrank.schedule`: :func:`decompose_many`, many configs of one matrix
  sharing work (leaders, warm starts, twins, repairs);
* :mod:`~bitalloc.lowrank.state`: validation, per-matrix state, :class:`Decomposition`;
* :mod:`~bitalloc.lowrank.policy`: :class:`LoopPolicy`, every tuning knob.
"""

from bitalloc.lowrank.loop import decompose
from bitalloc.lowrank.policy import MANY_CONFIGS, ONE_CONFIG, LoopPolicy
from bitalloc.lowrank.schedule import decompose_many
from bitalloc.lowrank.state import Decomposition, fisher_scalings

__all__ = ["Decomposition", "LoopPolicy", "MANY_CONFIGS", "ONE_CONFIG", "decompose", "decompose_many",
           "fisher_scalings"]
