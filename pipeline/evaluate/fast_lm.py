"""``FastMCLM``: lm-eval's HFLM with multiple-choice ``loglikelihood`` scored by shared prefix.

Imported only by :mod:`pipeline.evaluate.lm_eval_runner` (lazily), so the rest of the
pipeline still never imports ``lm_eval``; the torch work lives in
:mod:`pipeline.evaluate.mc_scoring`, which knows nothing of lm-eval.
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from pipeline.evaluate import mc_scoring

log = logging.getLogger(__name__)

_AUTO_GROUPS = 8  # groups per forward when lm-eval's batch size is "auto"
_PROBE_LEN = 16


class FastMCLM(HFLM):
    """HFLM whose ``loglikelihood`` computes each shared prefix once, logits only where scored.

    Why: HFLM runs every ``context + choice`` as its own row and projects every position onto
    the vocabulary. On the embedded Gemma 3 270M (262k-token vocabulary) the output layer is
    a large part of the work, and a 7-way SIB-200 question repeats its text 7 times. On the
    CPU (one thread, 40 English documents per suite) this scorer does 3.3x the documents/s of
    HFLM's best batch size: SIB-200 4.8x, XNLI 2.1x (its choices are whole sentences, every
    token is scored), Belebele 2.9x (one-token choices HFLM already scores in one forward);
    log-likelihoods within 6e-5 nats (``benchmarks/RESULTS.md``, "Task evaluation speed";
    ``benchmarks/task_eval_speed.py``).

    How it differs from HFLM (see :mod:`pipeline.evaluate.mc_scoring`): requests sharing an
    input prefix (the choices of one question; XNLI hypotheses with one premise) are grouped,
    the prefix is run once with a KV cache and each request's remaining tokens once on it;
    the output layer is applied only at the scored positions (``logits_to_keep``); groups are
    batched by length. Inputs are built exactly as HFLM builds them (same tokenisation, left
    truncation to ``max_length + 1``), so log-likelihoods match HFLM's to float rounding and
    ``is_greedy`` is the same test. One exception, in HFLM: with its default ``logits_cache``,
    requests with equal ``context + continuation[:-1]`` tokens but contexts ending at
    different tokens get the first one's logits gathered at the wrong positions; here each is
    scored as HFLM scores it with ``logits_cache=False`` (a plain forward).

    Everything else is HFLM's: tokenisation, ``loglikelihood_rolling`` (which keeps HFLM's
    ``_loglikelihood_tokens``), ``generate_until``, device and dtype (read from the model).
    Models the probe in :func:`mc_scoring.supports_fast_scoring` rejects, and seq2seq models,
    are scored by HFLM itself (one warning).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_loglikelihood = False

    def loglikelihood(self, requests: list[Instance],
                      disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """HFLM's tokenisation, then :func:`mc_scoring.score` on the token ids."""
        self._in_loglikelihood = True
        try:
            # lm-eval's tokenising bar takes a second; the scoring bar (mc_scoring) is the one
            # that tracks the work
            return super().loglikelihood(requests, disable_tqdm=True)
        finally:
            self._in_loglikelihood = False

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if not (self._in_loglikelihood and self._fast_path_ok(requests)):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=override_bs)
        groups = self.batch_size if isinstance(self.batch_size, int) else _AUTO_GROUPS
        answers = mc_scoring.score(
            self.model, [(ctx, cont) for _, ctx, cont in requests], max_length=self.max_length,
            batch_size=groups, pad_id=self._pad_id(), progress=not disable_tqdm,
        )
        for (request_str, _, _), answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return answers

    def _fast_path_ok(self, requests: list[tuple[Any, list[int], list[int]]]) -> bool:
        if self.backend != "causal" or not requests:
            return False
        longest = max((ctx + cont for _, ctx, cont in requests), key=len)
        probe = (longest * _PROBE_LEN)[:_PROBE_LEN] if len(longest) < 4 else longest[:_PROBE_LEN]
        ok = mc_scoring.supports_fast_scoring(self.model, probe)
        if not ok and not getattr(self, "_warned_fallback", False):
            log.warning("%s: shared-prefix scoring does not reproduce the model's logits; "
                        "scoring with HFLM", type(self.model).__name__)
            self._warned_fallback = True
        return ok

    def _pad_id(self) -> int:
        for tid in (self.tokenizer.pad_token_id, self.eot_token_id):
            if tid is not None:
                return int(tid)
        return 0
