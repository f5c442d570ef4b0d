"""The `serve deploy` config is valid for Ray Serve's own schema and names the application `ekd serve`
runs."""

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from services.serve.deployments import APP_NAME, teacher_deployment_name
from services.serve.serve_config import load_serve_config

REPO = Path(__file__).resolve().parents[2]


def test_serve_deploy_config_matches_the_local_service_config(monkeypatch):
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load((REPO / "configs/serve/digits.serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.name == APP_NAME and app.import_path == "services.serve.deployments:app_builder"
    service = load_serve_config(app.args["config"])
    assert {d.name for d in app.deployments} == {teacher_deployment_name(t.name) for t in service.teachers}
