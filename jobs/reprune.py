"""The weights a run evaluated, put into the analysis model: dense x mask, or re-pruned.

Mask-only methods (magnitude, Wanda, RIA) zero the masked weights and leave the rest dense,
so applying the stored mask to the dense model *is* the evaluated model. A method that also
updates the weights it keeps (:attr:`pipeline.pruners.base.LayerPruner.updates_weights`, e.g.
SparseGPT) cannot be reproduced from the mask. Its run is re-pruned: the run's logged config
(``config.yaml``) calibrates and prunes the loaded dense model again with
:func:`pipeline.stages.calibrate` and :func:`pipeline.stages.prune`, as :mod:`jobs.main` did.

Why re-prune rather than store the kept values: a stored copy of every kept weight is
(1 - sparsity) x the model in the run's dtype per run, 16-32x the 1-bit mask, for every
member of every sweep; pruning is bit-reproducible on the same device and dtype, and the mask
sha256 the run logged is a proof that the re-pruned model is the evaluated one (the mask is
a function of the same computation that produced the updated weights). A mismatch (another
device or dtype, other code, a replaced artifact) is refused rather than analysed silently.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from typing import Any

from pipeline.config import Config
from pipeline.errors import LangpruneError
from pipeline.masks import PackedMask, apply_masks, masks_sha256
from pipeline.pruners import PRUNERS
from tracking import runs_table as RT

log = logging.getLogger(__name__)

#: ``langprune.analysis.weights`` of a run analysed on its re-pruned (evaluated) weights.
WEIGHTS_PRUNED = "pruned (re-pruned, mask sha256 verified)"
#: ... of a mask-only method, where dense x mask is the evaluated model.
WEIGHTS_MASKED = "dense x mask"
SHA_TAG = "langprune.masks_sha256"


def updates_weights(method: str) -> bool:
    """Whether the registered pruning method changes the weights it keeps."""
    return PRUNERS.get(method).updates_weights


def member_config(analysis: Config, member: RT.Member) -> Config:
    """The member's logged ``config.yaml``, run on this job's device and offload setting."""
    with tempfile.TemporaryDirectory() as tmp:
        path = RT.download_artifact(member.run_id, "config.yaml", tmp)
        if path is None:
            raise LangpruneError(f"run {member.run_id} has no config.yaml to re-prune from")
        overrides = {"device": analysis.model.device, "offload": analysis.model.offload}
        return Config.from_yaml(path, overrides=overrides)


def apply_run_weights(ctx: Any, member: RT.Member, packed: Mapping[str, PackedMask]) -> str:
    """Turn ``ctx.engine.model`` (dense) into the model the run evaluated.

    Args:
        ctx: The analysis :class:`analysis.measure.Context` (model, device, tokenizer).
        member: The run.
        packed: Its stored masks (already checked against the logged sha256).

    Returns:
        The ``langprune.analysis.weights`` tag value.

    Raises:
        LangpruneError: the re-pruned mask's sha256 is not the one the run logged.
    """
    from pipeline import stages

    if not updates_weights(member.method):
        apply_masks(ctx.engine.model, packed)
        return WEIGHTS_MASKED
    cfg = member_config(ctx.cfg, member)
    if cfg.model.dtype != ctx.cfg.model.dtype:
        log.warning("run %s pruned in %s, the analysis model is %s: the re-prune will likely "
                    "not reproduce it", member.run_id, cfg.model.dtype, ctx.cfg.model.dtype)
    calib = stages.calibrate(cfg, ctx.tokenizer)
    result = stages.prune(cfg, ctx.engine.model, calib.windows, ctx.engine.device,
                          progress=False)
    got, logged = masks_sha256(result.masks), member.tags.get(SHA_TAG, "")
    if got != logged:
        raise LangpruneError(
            f"run {member.run_id}: re-pruning its config gives masks with sha256 {got[:12]}..., "
            f"the run logged {logged[:12] or 'none'}...: the analysis cannot reproduce the "
            "evaluated weights (other device, dtype or code?)")
    return WEIGHTS_PRUNED
