"""What a tiny main run prints: stage lines and the summary, not third-party noise."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from jobs.console import QUIET_MESSAGES, configure_logging
from pipeline.paths import REPO_ROOT


def test_tiny_main_run_prints_the_summary_and_no_lm_eval_chatter(tiny_model_dir, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "LANGPRUNE_CACHE": str(tmp_path / "cache")}
    env.pop("LANGPRUNE_LOG", None)
    cmd = [sys.executable, "-m", "pipeline", "main", f"model={tiny_model_dir}",
           "calib_lang=zh", "eval_langs=en,zh", "tasks=sib200", "limit=4", "n_samples=4",
           "seq_len=64", "eval_tokens=256", f"output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Overwriting default num_fewshot" not in out
    assert "`pretrained` model kwarg is not of type `str`" not in out
    assert "Started monitoring system metrics" not in out
    # the summary: per language, dense vs pruned perplexity and the task with its interval
    assert "perplexity and task accuracy per evaluation language, 95% intervals" in out
    table = out[out.index("95% intervals"):]
    assert "ppl dense" in table and "ratio" in table and "sib200" in table
    assert table.count(" [") >= 2  # an interval per language's task cell
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out


def test_quiet_filters_drop_only_the_listed_messages_and_verbose_keeps_all(caplog):
    evaluator = logging.getLogger("lm_eval.evaluator")
    try:
        configure_logging(verbose=False)
        assert evaluator.filters, "the quiet filter is installed"
        record = evaluator.makeRecord("lm_eval.evaluator", logging.WARNING, __file__, 1,
                                      "Overwriting default num_fewshot of x from None to 0",
                                      (), None)
        other = evaluator.makeRecord("lm_eval.evaluator", logging.WARNING, __file__, 1,
                                     "a real problem", (), None)
        assert not evaluator.filter(record) and evaluator.filter(other)
        assert QUIET_MESSAGES["lm_eval.evaluator"][0] in record.getMessage()
    finally:
        for name in QUIET_MESSAGES:
            logging.getLogger(name).filters.clear()
        logging.getLogger("lm_eval").setLevel(logging.NOTSET)
    configure_logging(verbose=False)
    configure_logging(verbose=True)
    assert not evaluator.filters
    assert logging.getLogger("lm_eval").level == logging.NOTSET  # back to the root's level
