"""A SparseGPT sweep member is analysed on its re-pruned weights, not on dense x mask.

One tiny Gemma 3 sweep (sparsegpt, one calibration language and set, two evaluation
languages); the analysis must tag the run as pruned weights, its SNR must differ from the
dense x mask model's, and a mask that the re-prune does not reproduce must be refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import jobs.analyze as A
from analysis.snr import snr_db
from jobs.reprune import WEIGHTS_PRUNED
from jobs.sweep import run_sweep
from pipeline.config import Config
from pipeline.errors import LangpruneError
from pipeline.masks import apply_masks, load_packed, save_masks
from tests.integration.test_analyze_report import _layer_outputs
from tests.stores import tiny_gemma_store
from tracking import runs_table as RT

LANGS = ["de", "en"]
OVERRIDES = {
    "n_samples": "4", "seq_len": "32", "eval_langs": ",".join(LANGS), "eval_tokens": "128",
    "eval_seq_len": "64", "tasks": "", "device": "cpu", "experiment": "t",
    "sweep_langs": "de", "sweep_methods": "sparsegpt", "sweep_sets": "1",
    "analysis_tokens": "96", "analysis_seq_len": "48", "lape_top_rate": "0.05",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsegpt")
    with tiny_gemma_store(root) as (_, model_dir, uri):
        cfg = Config.from_overrides({**OVERRIDES, "model": str(model_dir)})
        sweep_id = run_sweep(cfg)
        A.run_analyze(cfg)
        yield {"root": root, "cfg": cfg, "sweep": sweep_id, "client": MlflowClient(uri),
               "model_dir": model_dir}


def _windows(model_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    from analysis import text as T
    from pipeline.data.sources import load_eval_sentences

    tok = AutoTokenizer.from_pretrained(model_dir)
    return T.analysis_windows(tok, load_eval_sentences("flores", "de"), 96, 48)


def test_sparsegpt_is_analysed_on_its_pruned_weights(env, tmp_path):
    from transformers import AutoModelForCausalLM

    member = RT.load_sweep(env["sweep"]).members[0]
    run = env["client"].get_run(member.run_id)
    assert run.data.tags["langprune.analysis.weights"] == WEIGHTS_PRUNED
    assert run.data.tags["langprune.analysis.lsar_source"] == "belebele"  # de and en have it
    dense = AutoModelForCausalLM.from_pretrained(env["model_dir"]).eval()
    masked = AutoModelForCausalLM.from_pretrained(env["model_dir"]).eval()
    apply_masks(masked, load_packed(RT.download_masks(member.run_id, tmp_path)))
    ids = _windows(env["model_dir"])
    x_mask = [snr_db(d, p) for d, p in zip(_layer_outputs(dense, ids), _layer_outputs(masked, ids))]
    snr = RT.read_csv_artifact(member.run_id, RT.SNR_TABLE)
    acc = snr[(snr["kind"] == "accumulated") & (snr["eval_lang"] == "de")].sort_values("layer")
    assert np.all(np.isfinite(acc["snr_db"]))
    assert np.max(np.abs(acc["snr_db"].to_numpy() - np.array(x_mask))) > 0.1


def test_a_mask_the_re_prune_does_not_reproduce_is_refused(env, tmp_path):
    member = RT.load_sweep(env["sweep"]).members[0]
    packed = load_packed(RT.download_masks(member.run_id, tmp_path / "orig"))
    name = sorted(packed)[0]
    mask = packed[name].unpack().clone()
    mask.view(-1)[0] = ~mask.view(-1)[0]
    path = tmp_path / "masks.safetensors"
    sha = save_masks({**packed, name: mask}, path)
    env["client"].log_artifact(member.run_id, str(path), "masks")  # the file and its tag agree
    env["client"].set_tag(member.run_id, "langprune.masks_sha256", sha)
    with pytest.raises(LangpruneError, match="re-pruning its config gives masks"):
        A.run_analyze(env["cfg"].replace(force="true"))
