"""The blend search on tiny models: simplex, trial 0, failures, resume, two workers, fast-mode
statistics against the engine's, and the verdict's arithmetic."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from jobs import search as S
from jobs.search import job as J
from jobs.search import trials as T
from jobs.search import verdict as V
from pipeline.config import Config
from pipeline.data.sampler import build_calibration, largest_remainder
from pipeline.engine import blend as B
from pipeline.errors import LangpruneError
from pipeline.paths import REPO_ROOT
from pipeline.pruners import ColumnSquares, SparsityTarget, WandaPruner
from tracking import optuna_mlflow as OM
from tracking import params as P
from tracking.runs import Interrupted

optuna.logging.set_verbosity(optuna.logging.WARNING)


def overrides(model_dir, tmp_path, **kw) -> dict[str, str]:
    base = {"model": str(model_dir), "n_samples": "4", "seq_len": "32", "eval_tokens": "64",
            "search_eval_tokens": "64", "tasks": "", "device": "cpu", "experiment": "t",
            "languages": "de,en,sw", "target_lang": "sw", "verdict_sets": "2",
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "n_trials": "3"}
    return {**base, **kw}


def small_cfg(model_dir, tmp_path, **kw) -> Config:
    return Config.from_overrides(overrides(model_dir, tmp_path, **kw))


def load_study(cfg: Config) -> optuna.Study:
    return optuna.load_study(study_name=S.default_study_name(cfg), storage=cfg.search.storage)


def trial_runs(client: MlflowClient, study_name: str):
    exp = client.get_experiment_by_name("t")
    flt = f"tags.`{OM.TAG_STUDY}` = '{study_name}' and tags.`{P.TAG_KIND}` = 'trial'"
    return client.search_runs([exp.experiment_id], flt, max_results=1000)


# ---- the simplex ----------------------------------------------------------------------------


def _check_point(point: S.BlendPoint, pool: list[str], n: int) -> None:
    assert set(point.weights) == set(pool)
    assert all(w >= 0 for w in point.weights.values())
    assert math.isclose(sum(point.weights.values()), 1.0, abs_tol=1e-12)
    assert sum(point.counts.values()) == n and all(c > 0 for c in point.counts.values())
    assert set(point.counts) <= set(pool)
    # the effective blend is a valid config blend that reproduces the same windows
    calib = Config.from_overrides({"calib_blend": point.label, "n_samples": str(n)}).calib
    assert {k: c for k, c in largest_remainder(calib.blend, n).items() if c} == point.counts


def test_every_raw_point_is_a_valid_blend():
    rng = np.random.default_rng(0)
    pool = ["ar", "de", "en", "sw", "zh"]
    for _ in range(400):
        raw = rng.random(len(pool))
        raw[rng.random(len(pool)) < 0.3] = 0.0  # exact zeros, sometimes all of them
        n = int(rng.integers(1, 64))
        _check_point(S.blend_from_raw(dict(zip(pool, raw.tolist())), n), pool, n)
    uniform = S.blend_from_raw(dict.fromkeys(pool, 0.0), 10)
    assert uniform.counts == {"ar": 2, "de": 2, "en": 2, "sw": 2, "zh": 2}
    with pytest.raises(LangpruneError):
        S.blend_from_raw({"de": -0.1, "en": 1.0}, 8)

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = []
    study.optimize(lambda t: seen.append(S.suggest_blend(t, pool, 16)) or 0.0, n_trials=150)
    for point in seen:
        _check_point(point, pool, 16)
    assert len({p.label for p in seen}) > 50  # the space is really explored


def test_objective_direction_table_and_values():
    ppl = S.Objective({"ppl": 1.0}, "sw")
    assert ppl.direction == "minimize" and ppl.tasks == []
    assert ppl.value({"ppl.sw": 12.5, "ppl.de": 3.0}) == 12.5
    acc = S.Objective({"sib200": 1.0}, "sw")
    assert acc.direction == "maximize" and acc.tasks == ["sib200"]
    mix = S.Objective({"ppl": 0.5, "sib200": 10.0}, "sw")
    assert mix.direction == "minimize"
    assert mix.value({"ppl.sw": 20.0, "sib200.sw": 0.4}) == pytest.approx(0.5 * 20 - 10 * 0.4)
    with pytest.raises(S.TrialFailure, match="missing"):
        ppl.value({"ppl.de": 1.0})
    with pytest.raises(S.TrialFailure, match="nan"):
        ppl.value({"ppl.sw": float("nan")})
    with pytest.raises(LangpruneError, match="no bundled data"):
        S.Objective({"belebele": 1.0}, "sw").validate()  # Belebele has no Swahili bundled


# ---- the verdict's arithmetic ------------------------------------------------------------------


def test_paired_interval_and_decision_on_hand_made_numbers():
    mean, low, high, tq = S.paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and tq == pytest.approx(4.302652729911275)  # t(0.975, 2)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half))
    assert S.decide(low, high) == "inconclusive"
    assert S.make_verdict("sw", "de:0.5,sw:0.5", [0.9, 1.0, 1.1], [], "ppl").answer == "yes"
    assert S.make_verdict("sw", "de:0.5,sw:0.5", [-0.9, -1.0, -1.1], [], "ppl").answer == "no"
    v = S.make_verdict("sw", "de:1.0", [0.5], [], "ppl")
    assert v.answer == "inconclusive" and v.statement.endswith("for sw: inconclusive")


def _study_with(trials, direction="minimize"):
    study = optuna.create_study(direction=direction)
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    for params, value in trials:
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dist for k in params}, value=value))
    return study


def test_target_only_best_still_re_runs_the_best_non_target_blend(monkeypatch):
    cfg = Config.from_overrides({"languages": "de,sw", "target_lang": "sw", "n_samples": "4",
                                 "verdict_sets": "3"})
    study = _study_with([({"w_de": 0.0, "w_sw": 1.0}, 10.0),   # target-only, the best
                         ({"w_de": 1.0, "w_sw": 0.0}, 12.0),   # de only
                         ({"w_de": 1.0, "w_sw": 1.0}, 11.0)])  # de:0.5,sw:0.5, best non-target
    point, is_best = S.challenger(study, ["de", "sw"], "sw", 4)
    assert point.label == "de:0.5,sw:0.5" and not is_best
    seen = []

    def fake_value(ctx, point, calib_set, role):  # exact re-runs: blend worse by 1 +- 0.1
        seen.append((point.label, calib_set, role))
        return (10.0 + 0.1 * calib_set, "t") if role == "target-only" else (11.0, "b")

    monkeypatch.setattr(V, "_verdict_value", fake_value)
    monkeypatch.setattr(V, "check_verdict_corpora", lambda ctx, blends: None)  # no model here
    ctx = T._Search(cfg, S.Objective({"ppl": 1.0}, "sw"), ["de", "sw"], "x", "0", None, None)
    verdict = S.run_verdict(ctx, study)
    assert {label for label, _, role in seen if role == "blend"} == {"de:0.5,sw:0.5"}
    assert sorted({k for _, k, _ in seen}) == [1, 2, 3]  # fresh sets: never the search's 0
    assert verdict.answer == "no" and verdict.ci_high < 0
    assert "best non-target blend" in verdict.detail
    assert verdict.mean == pytest.approx(-0.8)


def test_verdict_sets_and_text_are_disjoint_from_the_search():
    assert V.verdict_calib_sets(0, 3) == [1, 2, 3]
    assert V.verdict_calib_sets(2, 3) == [0, 1, 3]
    sentences = [f"s{i}" for i in range(10)]
    from pipeline.config import text_part

    selection, verdict = text_part(sentences, "selection"), text_part(sentences, "verdict")
    assert not set(selection) & set(verdict) and selection + verdict == sentences
    cfg = Config.from_overrides({"languages": "de,sw", "target_lang": "sw"})
    ctx = T._Search(cfg, S.Objective({"ppl": 1.0}, "sw"), ["de", "sw"], "x", "0", None, None)
    assert ctx.eval_cfg(64).eval.eval_part == "selection"
    assert ctx.eval_cfg(64, T.VERDICT).eval.eval_part == "verdict"
    params = J._parent_params(cfg, "x", ["de", "sw"], ctx.objective)
    assert (params["search_calib_set"], params["verdict_calib_sets"]) == ("0", "1,2,3")
    assert "second" in params["verdict_eval_text"]


def test_every_blend_language_is_checked_for_every_verdict_set(tiny_model_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from pipeline.data.sampler import available_windows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    have = available_windows(tok, "ntrex", "de", 64)
    # set 3 of a blend with `have // 3` German windows needs 4x that: more than there is
    cfg = Config.from_overrides({"languages": "de,sw", "target_lang": "sw", "seq_len": "64",
                                 "n_samples": str(have // 3), "verdict_sets": "3"})
    ctx = T._Search(cfg, S.Objective({"ppl": 1.0}, "sw"), ["de", "sw"], "x", "0", None, None)
    ctx.loaded = SimpleNamespace(tokenizer=tok)
    blend = S.blend_from_raw({"de": 1.0, "sw": 0.0}, have // 3)
    with pytest.raises(LangpruneError, match=r"ntrex/de holds .* calibration set 3 needs"):
        V.check_verdict_corpora(ctx, [blend])


def test_no_non_target_trial_is_inconclusive():
    cfg = Config.from_overrides({"languages": "de,sw", "target_lang": "sw", "n_samples": "4"})
    study = _study_with([({"w_de": 0.0, "w_sw": 1.0}, 10.0)])
    ctx = T._Search(cfg, S.Objective({"ppl": 1.0}, "sw"), ["de", "sw"], "x", "0", None, None)
    verdict = S.run_verdict(ctx, study)  # would fail on ctx.loaded=None if it re-ran anything
    assert verdict.answer == "inconclusive" and "no completed non-target" in verdict.detail


# ---- fast-mode statistics ---------------------------------------------------------------


class _Recording(WandaPruner):
    """Wanda that records the statistic it is given for every pruned matrix."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def prune(self, weight, statistic, target):
        self.seen.append(statistic.sum_sq.clone())
        return super().prune(weight, statistic, target)


def test_fast_first_layer_statistics_equal_the_engines(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.engine import prune_layerwise

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    base = Config.from_overrides({"n_samples": "6", "seq_len": "32"})
    cpu = torch.device("cpu")
    stats = {lang: B.collect_language_stats(
        model, build_calibration(tok, base.replace(calib_lang=lang).calib, 0,
                                 progress=False).windows, lang, WandaPruner(), device=cpu,
        batch_size=4) for lang in ("de", "sw")}
    point = S.blend_from_raw({"de": 1.0, "sw": 2.0}, 6)
    assert point.counts == {"de": 2, "sw": 4}
    windows = build_calibration(tok, base.replace(calib_blend=point.label).calib, 0,
                                progress=False).windows
    recorder = _Recording()
    target = SparsityTarget(0.5)
    prune_layerwise(model, windows, recorder, target, device=cpu, batch_size=4, progress=False)
    layer0 = stats["de"].layers[0]
    expected = [B.combine_stats(stats, point.counts, 0, j).sum_sq
                for j, group in enumerate(layer0) for _ in group.names]
    n0 = len(expected)
    for got, want in zip(recorder.seen[:n0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # later layers see pruned inputs in exact mode, dense ones in fast mode: they differ
    first_of_layer1 = B.combine_stats(stats, point.counts, 1, 0).sum_sq
    assert not torch.allclose(recorder.seen[n0], first_of_layer1, rtol=1e-4)

    # same layer-0 statistics -> the same layer-0 weights after pruning
    exact_layer0 = {k: v.clone() for k, v in model.model.layers[0].state_dict().items()}
    model.load_state_dict(dense)
    sparsity = B.prune_from_stats(model, stats, point.counts, WandaPruner(), target, device=cpu)
    assert sparsity == pytest.approx(0.5)
    for k, v in model.model.layers[0].state_dict().items():
        torch.testing.assert_close(v, exact_layer0[k])


def test_statistics_cache_round_trip(tmp_path):
    stats = B.LanguageStats("de", ColumnSquares, 3, [[B.GroupStats(("q", "k"), torch.rand(3, 4))],
                                                 [B.GroupStats(("o",), torch.rand(3, 2))]])
    path = tmp_path / "s.safetensors"
    B.save_stats(stats, path)
    back = B.load_stats(path, torch.device("cpu"))
    assert back.lang == "de" and back.n_windows == 3 and back.layers[0][0].names == ("q", "k")
    torch.testing.assert_close(back.layers[1][0].tensor, stats.layers[1][0].tensor)
    assert B.load_stats(tmp_path / "missing.safetensors", torch.device("cpu")) is None


# ---- studies ------------------------------------------------------------------------------------


def test_a_resumed_study_must_keep_its_config(tmp_path):
    cfg = Config.from_overrides({"storage": f"sqlite:///{tmp_path / 'o.db'}"})
    obj, pool, url = J._validate(cfg)
    S.open_study(cfg, obj, pool, url)
    other = cfg.replace(sparsity="0.6")
    with pytest.raises(LangpruneError, match="sparsity"):
        S.open_study(other, obj, pool, url)


def test_trial0_target_only_interrupt_and_resume(store, tiny_model_dir, tmp_path, monkeypatch):
    real, calls = T._fast_trial, []

    def stopped_at_second(ctx, point):
        calls.append(point.label)
        if len(calls) == 2:
            raise Interrupted("received signal SIGTERM")  # what the CLI's handler raises
        return real(ctx, point)

    monkeypatch.setattr(T, "_fast_trial", stopped_at_second)
    cfg = small_cfg(tiny_model_dir, tmp_path, n_trials="3")
    with pytest.raises(Interrupted):
        S.run_search(cfg, progress=False)
    study = load_study(cfg)
    # all n_trials are enqueued up front as slots; the third was never taken
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                               TrialState.WAITING]
    assert "Interrupted" in study.trials[1].user_attrs[OM.FAIL_ATTR]
    killed = {int(r.data.tags[OM.TAG_TRIAL]): r for r in trial_runs(store, study.study_name)}
    assert killed[1].info.status == "KILLED"

    monkeypatch.setattr(T, "_fast_trial", real)
    again = S.run_search(cfg.replace(n_trials="4"), progress=False)
    assert again.trials_run == 2  # n_trials is the study's total; the failed trial counts
    study = load_study(cfg)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert study.trials[0].params == {"w_de": 0.0, "w_en": 0.0, "w_sw": 1.0}
    assert [t.user_attrs.get("role") for t in study.trials] == ["target-only", None, None, None]
    assert study.trials[0].user_attrs[OM.BLEND_ATTR] == "sw:1.0"
    runs = trial_runs(store, study.study_name)
    assert sorted(int(r.data.tags[OM.TAG_TRIAL]) for r in runs) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {again.parent_run_id}
    assert all(r.data.params["mode"] == "fast" and "weight_raw.de" in r.data.params for r in runs)
    parent = store.get_run(again.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[P.TAG_STATE] == "complete"
    assert parent.data.tags["langprune.verdict"] in ("yes", "no", "inconclusive")
    assert parent.data.tags["langprune.best_run"] in {r.info.run_id for r in runs}
    assert "target_only.objective" in parent.data.metrics
    assert len(OM.find_study_parents(parent.info.experiment_id, study.study_name)) == 1


def test_a_failing_trial_is_recorded_and_the_study_continues(store, tiny_model_dir, tmp_path,
                                                             monkeypatch):
    real = T._fast_trial
    calls = []

    def flaky(ctx, point):
        calls.append(point.label)
        if len(calls) == 2:
            return {**real(ctx, point), "ppl.sw": float("nan")}
        if len(calls) == 3:
            raise RuntimeError("simulated out of memory")
        return real(ctx, point)

    monkeypatch.setattr(T, "_fast_trial", flaky)
    cfg = small_cfg(tiny_model_dir, tmp_path, n_trials="4")
    result = S.run_search(cfg, progress=False)
    study = load_study(cfg)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert "nan" in study.trials[1].user_attrs[OM.FAIL_ATTR]
    assert "simulated out of memory" in study.trials[2].user_attrs[OM.FAIL_ATTR]
    assert result.summary.n_failed == 2 and result.summary.n_complete == 2
    by_trial = {int(r.data.tags[OM.TAG_TRIAL]): r for r in trial_runs(store, study.study_name)}
    assert by_trial[2].info.status == "FAILED"
    assert "simulated out of memory" in by_trial[2].data.tags["langprune.error"]
    assert by_trial[3].info.status == "FINISHED" and "objective" in by_trial[3].data.metrics


def test_exact_mode_trials_are_tracked_pruned_runs(store, tiny_model_dir, tmp_path):
    cfg = small_cfg(tiny_model_dir, tmp_path, n_trials="2", mode="exact", eval_langs="sw")
    S.run_search(cfg, progress=False)
    study = load_study(cfg)
    for run in trial_runs(store, study.study_name):
        pruned = store.get_run(run.data.tags["langprune.pruned_run"])
        assert pruned.data.tags[P.TAG_KIND] == "pruned"
        assert pruned.data.params["calib_blend"] == run.data.params["calib_blend"]
        assert run.data.metrics["objective"] == pruned.data.metrics["ppl.sw"]


def test_two_processes_share_one_study(store, tiny_model_dir, tmp_path):
    store.create_experiment("t")  # the MLflow schema exists before the workers race
    n_trials = 6
    args = [f"{k}={v}" for k, v in overrides(tiny_model_dir, tmp_path, n_trials=str(n_trials),
                                            languages="de,sw").items()]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LANGPRUNE_LOG_LEVEL": "WARNING"}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "search", *args], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = load_study(small_cfg(tiny_model_dir, tmp_path, languages="de,sw"))
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) == n_trials  # workers take enqueued slots only: no overshoot
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    runs = trial_runs(store, study.study_name)
    assert sorted(int(r.data.tags[OM.TAG_TRIAL]) for r in runs) == numbers  # each exactly once
    assert {t.user_attrs[OM.RUN_ID_ATTR] for t in study.trials} == {r.info.run_id for r in runs}
    parents = OM.find_study_parents(store.get_experiment_by_name("t").experiment_id,
                                    study.study_name)
    assert len(parents) == 1
    assert sum(t.user_attrs.get("role") == "target-only" for t in study.trials) == 1


@pytest.mark.parametrize("overrides", [{}, {"study_name": "mine", "languages": "de,sw"}])
def test_parent_params_agree_with_what_mlflow_run_logs(overrides):
    """Under `mlflow run`, MLflow logs every entry-point param with its raw value before our
    code runs; a parent param with the same key and another value would be a conflict."""
    from tracking.params import same_param_value

    cfg = Config.from_overrides({"target_lang": "sw", **overrides})
    objective, pool, _ = J._validate(cfg)
    params = J._parent_params(cfg, S.default_study_name(cfg), pool, objective)
    raw = cfg.to_flat()
    for key, value in params.items():
        if key in raw:
            assert same_param_value(key, raw[key], value), f"{key}: {raw[key]!r} vs {value!r}"
    assert params["study"] == S.default_study_name(cfg)


def test_one_worker_claims_the_verdict_and_a_dead_owner_is_replaced(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    first = optuna.create_study(study_name="s", storage=url)
    second = optuna.load_study(study_name="s", storage=url)
    assert S.claim_verdict(first) is True
    assert S.claim_verdict(second) is False  # the owner (this process) is alive
    owner = optuna.load_study(study_name="s", storage=url).user_attrs[S.VERDICT_ATTR]
    assert owner.split(":")[1] == str(os.getpid())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = owner.split(":")[0]
    first.set_user_attr(S.VERDICT_ATTR, f"{host}:{dead}:0")  # a worker that died
    assert S.claim_verdict(second) is True
    assert S.claim_verdict(first) is False


def test_workers_raising_n_trials_together_top_the_slots_up_exactly(tmp_path):
    """Several workers start at once with a raised n_trials: the study gets exactly that many
    trials (one enqueues, the others wait for its mark), not one top-up per worker."""
    import threading

    url = f"sqlite:///{tmp_path / 'o.db'}"
    cfg = Config.from_overrides({"storage": url, "n_trials": "3"})
    obj, pool, _ = J._validate(cfg)
    study = S.open_study(cfg, obj, pool, url)
    assert len(study.trials) == 3
    raised = cfg.replace(n_trials="9")
    barrier, errors, studies = threading.Barrier(4), [], []

    def worker() -> None:
        try:
            barrier.wait()
            studies.append(S.open_study(raised, obj, pool, url))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(studies) == 4
    final = optuna.load_study(study_name=study.study_name, storage=url)
    assert [t.number for t in final.trials] == list(range(9))
    assert final.user_attrs[S.SLOTS_ATTR] == 9


def test_fast_mode_refuses_per_layer_sparsity_in_one_line():
    cfg = Config.from_overrides({"layer_sparsity": "owl", "mode": "fast"})
    with pytest.raises(LangpruneError, match="use mode=exact") as err:
        J._validate(cfg)
    assert "\n" not in str(err.value)


def test_ria_searches_in_fast_mode_through_its_statistic(tiny_model_dir):
    """A method added as one file (RIA, ColumnSquares) blends without any search code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.pruners import make_pruner

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base = Config.from_overrides({"n_samples": "4", "seq_len": "32", "method": "ria"})
    cpu = torch.device("cpu")
    pruner = make_pruner("ria")
    stats = {lang: B.collect_language_stats(
        model, build_calibration(tok, base.replace(calib_lang=lang).calib, 0,
                                 progress=False).windows, lang, pruner, device=cpu)
        for lang in ("de", "sw")}
    sparsity = B.prune_from_stats(model, stats, {"de": 2, "sw": 2}, pruner,
                                  SparsityTarget(0.5), device=cpu)
    assert sparsity == pytest.approx(0.5)
    J._validate(base)  # accepted: it reads calibration data
