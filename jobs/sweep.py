"""The ``sweep`` job: calibration languages x methods x calibration sets under one parent run."""

from __future__ import annotations

import logging

from jobs.console import print_sweep_summary
from jobs.main import _load, preflight, run_dense, run_main
from pipeline.config import Config, split_list
from pipeline.models import DenseSnapshot
from tracking import params as P
from tracking import runs as R

log = logging.getLogger(__name__)


def sweep_cells(cfg: Config) -> list[Config]:
    """The grid: methods x sparsities x calibration rows x calibration sets, in a stable
    order. The rows are the single sweep languages, then the ``sweep_blends`` rows."""
    s = cfg.sweep
    rows = [{"calib_lang": lang, "calib_blend": ""} for lang in split_list(s.sweep_langs)]
    rows += [{"calib_blend": blend} for blend in s.blend_rows()]
    sparsities = s.sparsity_list or [cfg.prune.sparsity]
    return [
        cfg.replace(method=m, sparsity=sparsity, calib_set=str(k), **row)
        for m in split_list(s.sweep_methods)
        for sparsity in sparsities
        for row in rows
        for k in range(s.sweep_sets)
    ]


def run_sweep(cfg: Config) -> str:
    """Every grid cell as a tracked run under one parent run; finished cells are reused.

    The parent records the member run ids (tag + ``sweep/members.json``), so reused runs
    from earlier sweeps or single ``main`` runs count as members without being copied.
    """
    cells = sweep_cells(cfg)  # every cell is validated (config and corpus) before heavy work
    exp_id, probe = preflight(cfg, [cell.calib for cell in cells])
    tags = P.run_tags(cfg, "sweep", "pending", "sweep")
    tags[P.TAG_HASH] = "sweep-" + cfg.config_hash()
    parent = R.attach_or_create(exp_id, f"sweep-{P.run_name(cfg, 'dense')[6:]}", tags,
                                take_launched=True)
    with R.run_guard(parent):
        parent.log_params({**P.to_mlflow_params(cfg, ("model", "eval", "sweep", "run")),
                           "sweep.cells": str(len(cells))})
        loaded = _load(cfg, probe)
        parent.set_tags({P.TAG_DEVICE: str(loaded.device)})
        dense_id, _ = run_dense(cfg, loaded, entry_point="sweep")
        snapshot = DenseSnapshot(loaded.model)
        members: list[dict[str, str]] = []
        for i, cell in enumerate(cells):
            log.info("sweep cell %d/%d: %s", i + 1, len(cells), P.run_name(cell))
            entry = {"method": cell.prune.method, "calib_lang": cell.calib.blend_label,
                     "row": cell.calib.row_label,
                     "calib_set": str(cell.calib.calib_set),
                     "sparsity": repr(cell.prune.sparsity)}
            try:  # one failing cell must not lose an overnight sweep
                res = run_main(cell, "sweep", parent_run_id=parent.run_id, loaded=loaded,
                               check=False)
                entry.update(run_id=res.run_id, reused=str(res.reused).lower(), status="ok")
            except Exception as e:
                log.error("sweep cell %s failed: %s", P.run_name(cell), e)
                entry.update(run_id="", reused="false", status=R.clip(f"failed: {e}", 300))
            finally:
                snapshot.restore()
            members.append(entry)
        failed = [m for m in members if m["status"] != "ok"]
        parent.log_json({"dense_run": dense_id, "members": members}, "sweep/members.json")
        parent.set_tags({P.TAG_DENSE: dense_id, "langprune.members": str(len(members)),
                         "langprune.failed_cells": str(len(failed))})
        parent.finish(state="complete" if not failed else "incomplete")
    print_sweep_summary(parent.run_id, dense_id, members)
    return parent.run_id
