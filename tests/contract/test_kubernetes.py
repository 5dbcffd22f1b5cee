"""The Kubernetes example (README "Running at scale") against MLflow's own code: the backend
config passes ``mlflow.projects._parse_kubernetes_config``, the ``k8s`` project passes
MLflow's project and docker-env validation, MLflow fills the job template into a complete
Job, and the ``k8s`` entry points are the root MLproject's."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from mlflow.projects import _parse_kubernetes_config
from mlflow.projects._project_spec import load_project
from mlflow.projects.docker import validate_docker_env
from mlflow.projects.utils import get_entry_point_command

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"


@pytest.fixture
def kube_config(monkeypatch):
    monkeypatch.chdir(ROOT)  # the README runs mlflow from the repository root
    backend = json.loads((K8S / "backend-config.json").read_text())
    return _parse_kubernetes_config(backend)


def test_backend_config_passes_mlflow_validation(kube_config):
    assert set(kube_config) >= {"kube-context", "repository-uri", "kube-job-template-path",
                                "kube-job-template"}
    assert kube_config["kube-job-template"]["kind"] == "Job"


def test_k8s_project_is_a_valid_docker_project_with_the_root_entry_points():
    k8s, root = load_project(str(K8S)), load_project(str(ROOT))
    validate_docker_env(k8s)  # what `mlflow run --backend kubernetes` checks first
    assert k8s.name == root.name == "langprune"
    k8s_yaml = yaml.safe_load((K8S / "MLproject").read_text())
    root_yaml = yaml.safe_load((ROOT / "MLproject").read_text())
    assert k8s_yaml["entry_points"] == root_yaml["entry_points"]  # no drift


def _mlflow_kubernetes_module(monkeypatch):
    """MLflow's kubernetes backend module; the ``kubernetes`` client package (needed only to
    talk to a cluster, not a dependency here) is replaced by an empty stand-in."""
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        fake = types.ModuleType("kubernetes")
        fake.config = types.ModuleType("kubernetes.config")
        exc = types.ModuleType("kubernetes.config.config_exception")
        exc.ConfigException = type("ConfigException", (Exception,), {})
        fake.config.config_exception = exc
        for name, mod in (("kubernetes", fake), ("kubernetes.config", fake.config),
                          ("kubernetes.config.config_exception", exc)):
            monkeypatch.setitem(sys.modules, name, mod)
    import mlflow.projects

    # imported here against the stand-in; forgotten again after the test
    monkeypatch.setitem(sys.modules, "mlflow.projects.kubernetes", None)
    monkeypatch.setattr(mlflow.projects, "kubernetes", None, raising=False)
    del sys.modules["mlflow.projects.kubernetes"]
    import mlflow.projects.kubernetes as kb

    return kb


def test_mlflow_fills_the_job_template_into_a_complete_job(kube_config, monkeypatch, tmp_path):
    kb = _mlflow_kubernetes_module(monkeypatch)
    monkeypatch.setenv("KUBE_MLFLOW_TRACKING_URI", "http://mlflow.langprune.svc:5000")
    project = load_project(str(K8S))
    storage = "postgresql+psycopg2://langprune@postgres.langprune.svc:5432/optuna"
    command = get_entry_point_command(
        project, "search", {"target_lang": "sw", "storage": storage}, str(tmp_path))
    template = copy.deepcopy(kube_config["kube-job-template"])
    job = kb._get_kubernetes_job_definition(
        project.name, "registry.example.com/langprune/langprune:abc", "sha256:0123",
        kb._get_run_command(command), {"MLFLOW_RUN_ID": "r1", "MLFLOW_EXPERIMENT_ID": "1"},
        template)
    assert job["metadata"]["name"].startswith("langprune-")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/langprune/langprune:abc@sha256:0123"
    assert container["command"][:4] == ["python", "-m", "pipeline", "search"]
    assert f"storage={storage}" in container["command"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.langprune.svc:5000"
    assert env["MLFLOW_RUN_ID"]["value"] == "r1"
    # the database password comes from a secret, never from the command line
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "langprune-db"
    assert not any("PASSWORD" in part.upper() for part in container["command"])
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
