"""deploy/ (kustomize base + overlays/cpu, jobs/) checked statically: core objects against the Kubernetes API
schema (kubernetes-validate), KubeRay and prometheus-operator objects against custom_resources.schema.yaml,
the RayService's serveConfigV2 against Ray Serve's own schema and against the application docker-compose runs,
and the wiring between them (selectors, ports, probes, GPUs, the Redis password)."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_files import (
    REPO,
    by_kind_and_name,
    compose_config,
    load_documents,
    pod_templates,
    ray_cluster_spec,
    repo_path,
)
from ray.serve.schema import ServeDeploySchema

from services.cache.authentication import TAG_BYTES
from services.cache.layout import BUCKET_HASH_BYTES
from services.serve import deployments
from services.serve.serve_config import load_serve_config

KUBERNETES_VERSION = "1.31"
"""The Kubernetes API the core objects are validated against (strict: unknown fields are errors)."""
CORE_KINDS = {"Service", "StatefulSet", "Secret", "ConfigMap", "PersistentVolumeClaim", "Job"}
CUSTOM_KINDS = {"RayService", "RayJob", "ServiceMonitor"}
SCHEMAS = yaml.safe_load((Path(__file__).parent / "custom_resources.schema.yaml").read_text())["$defs"]
OVERLAYS = ["base", "cpu"]
INGRESS_RESOURCE = "ekd_grpc_ingress"
HEADLINE_CONFIG = "/app/configs/serve/imagenet.yaml"
"""What deploy/base serves: SENet154 + ResNet152 on GPUs (deploy/overlays/cpu: docker-compose's digits)."""
HEADLINE_RECIPE = REPO / "configs" / "imagenet" / "seed000_ensemble_kd.yaml"
IMAGENET_TRAIN_IMAGES = 1_281_167
BYTES_PER_LOGITS_ENTRY = 2160
COMPACT_FRAME_BYTES = 63  # 1000 classes (services/formats/soft_labels.py)


def keeps_compact_buckets_small(directives: dict[str, str]) -> bool:
    """Whether a redis.conf keeps every bucket of the headline bank's compact entries (one teacher's views
    spread over its buckets) in the listpack encoding, HMAC-tagged values included."""
    views = yaml.safe_load(HEADLINE_RECIPE.read_text())["data"]["views"]
    per_bucket = IMAGENET_TRAIN_IMAGES * views / 2 ** (8 * BUCKET_HASH_BYTES)
    return (
        int(directives["hash-max-listpack-entries"]) >= 1.5 * per_bucket
        and int(directives["hash-max-listpack-value"]) >= COMPACT_FRAME_BYTES + TAG_BYTES
    )


"""Redis memory per cached output of 1000 fp16 logits (value, key and Redis's per-key overhead), measured with
services.cache's RedisStore and `INFO memory` over 20,000 entries."""


def validate_custom(obj: dict) -> None:
    jsonschema.Draft202012Validator({"$defs": SCHEMAS, "$ref": f"#/$defs/{obj['kind']}"}).validate(obj)


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def env_of(container: dict) -> list[tuple[str, dict]]:
    return [(entry["name"], entry) for entry in container.get("env", [])]


def serve_config_v2(build: list[dict]) -> dict:
    return yaml.safe_load(by_kind_and_name(build)["RayService", "ekd-teachers"]["spec"]["serveConfigV2"])


def serve_deployments(build: list[dict]) -> dict[str, dict]:
    (application,) = serve_config_v2(build)["applications"]
    return {deployment["name"]: deployment for deployment in application["deployments"]}


def worker_group(build: list[dict], name: str) -> dict:
    cluster = ray_cluster_spec(by_kind_and_name(build)["RayService", "ekd-teachers"])
    (group,) = [group for group in cluster["workerGroupSpecs"] if group["groupName"] == name]
    return group


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- schemas -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_of_a_validated_kind(builds, jobs, overlay):
    kinds = {obj["kind"] for obj in builds[overlay] + jobs}
    assert kinds <= CORE_KINDS | CUSTOM_KINDS
    assert {
        "Service",
        "StatefulSet",
        "Secret",
        "ConfigMap",
        "PersistentVolumeClaim",
        "RayService",
        "ServiceMonitor",
    } <= {obj["kind"] for obj in builds[overlay]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_are_valid_kubernetes(builds, jobs, overlay):
    for obj in builds[overlay] + jobs:
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_templates_inside_custom_resources_are_valid_kubernetes(builds, jobs, overlay):
    checked = []
    for obj in builds[overlay] + jobs:
        if obj["kind"] not in CUSTOM_KINDS:
            continue
        for role, template in pod_templates(obj).items():
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": role},
                "template": template,
            }
            kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
            checked.append((obj["kind"], role))
    assert {
        ("RayService", "head"),
        ("RayService", "teachers"),
        ("RayService", "grpc-ingress"),
        ("RayJob", "head"),
        ("RayJob", "submitter"),
    } <= set(checked)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_api(builds, jobs, overlay):
    custom = [obj for obj in builds[overlay] + jobs if obj["kind"] in CUSTOM_KINDS]
    assert {obj["kind"] for obj in custom} == CUSTOM_KINDS
    for obj in custom:
        validate_custom(obj)


def test_validators_reject_what_the_api_server_would(builds):
    rayservice = by_kind_and_name(builds["base"])["RayService", "ekd-teachers"]
    misspelled = {**rayservice, "spec": {**rayservice["spec"], "serveConfigv2": "x"}}
    with pytest.raises(jsonschema.ValidationError, match="serveConfigv2"):
        validate_custom(misspelled)
    service = by_kind_and_name(builds["base"])["Service", "ekd-teachers-grpc"]
    misspelled = {**service, "spec": {**service["spec"], "selectr": service["spec"]["selector"]}}
    with pytest.raises(kubernetes_validate.ValidationError, match="selectr"):
        kubernetes_validate.validate(misspelled, KUBERNETES_VERSION, strict=True)
    string_port = {**service, "spec": {**service["spec"], "ports": [{"name": "serve-grpc", "port": "50051"}]}}
    with pytest.raises(kubernetes_validate.ValidationError, match="'50051' is not of type 'integer'"):
        kubernetes_validate.validate(string_port, KUBERNETES_VERSION, strict=True)


def test_ray_version_is_the_pinned_one(builds, jobs):
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_pin,) = [pin for pin in pins if pin.startswith("ray[")]
    for obj in builds["base"] + builds["cpu"] + jobs:
        if obj["kind"] in ("RayService", "RayJob"):
            assert ray_pin.endswith(f"=={ray_cluster_spec(obj)['rayVersion']}")


# --- the Serve application ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_application() -> dict:
    """What docker-compose's ray-head runs: `ekd serve CONFIG`, i.e. application APP_NAME built by
    app_builder({config: CONFIG}) with no HTTP route; with its config loaded as ray-head loads it."""
    ray_head = compose_config("docker-compose.yml")["services"]["ray-head"]
    command = ray_head["command"]
    assert command[:2] == ["ekd", "serve"] and len(command) == 3
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("EKD_CACHE_URI", ray_head["environment"]["EKD_CACHE_URI"])
        config = load_serve_config(repo_path(command[2]))
    builder = deployments.app_builder
    return {
        "name": deployments.APP_NAME,
        "import_path": f"{builder.__module__}:{builder.__name__}",
        "args": {"config": command[2]},
        "route_prefix": None,
        "config": config,
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_is_a_valid_serve_config(builds, overlay):
    ServeDeploySchema.model_validate(serve_config_v2(builds[overlay]))


@pytest.fixture(scope="module")
def applications(local_application) -> dict[str, dict]:
    """What each overlay's RayService should run: deploy/base the headline ensemble, deploy/overlays/cpu the
    local stack's digits application."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("EKD_CACHE_URI", "redis://ekd-redis:6379/0")
        headline = load_serve_config(repo_path(HEADLINE_CONFIG))
    return {
        "base": {**local_application, "args": {"config": HEADLINE_CONFIG}, "config": headline},
        "cpu": local_application,
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_runs_the_overlays_application(builds, applications, overlay):
    (application,) = serve_config_v2(builds[overlay])["applications"]
    for field in ("name", "import_path", "args", "route_prefix"):
        assert application[field] == applications[overlay][field], field
    config = applications[overlay]["config"]
    expected = {deployments.teacher_deployment_name(teacher.name) for teacher in config.teachers}
    expected.add(deployments.INGRESS_DEPLOYMENT)
    assert set(serve_deployments(builds[overlay])) == expected


def test_base_serves_the_headline_ensemble_as_the_recipe_names_it(applications):
    config = applications["base"]["config"]
    recipe = yaml.safe_load(HEADLINE_RECIPE.read_text())
    assert [teacher.name for teacher in config.teachers] == [t["name"] for t in recipe["teachers"]]
    assert {teacher.architecture for teacher in config.teachers} == {"legacy_senet154", "resnet152"}
    for teacher in config.teachers:
        assert teacher.num_classes == 1000
        assert (teacher.precision, teacher.channels_last, teacher.compile) == ("bf16", True, True)
        assert teacher.autoscaling is not None and teacher.autoscaling.max_replicas > 1


def test_cpu_overlay_serves_the_digits_stack(applications):
    architectures = {teacher.architecture for teacher in applications["cpu"]["config"].teachers}
    assert architectures == {"cifar_resnet56", "cifar_wrn16_4"}


def test_gpu_base_gives_each_teacher_replica_a_gpu_of_its_own(builds, applications):
    config = applications["base"]["config"]
    deployment_options = serve_deployments(builds["base"])
    teachers = {deployments.teacher_deployment_name(teacher.name): teacher for teacher in config.teachers}
    assert all(deployment_options[name]["ray_actor_options"]["num_gpus"] == 1 for name in teachers)
    # Replicas come from the config (autoscaling): serveConfigV2 sets none, which would override it.
    assert not any(
        {"num_replicas", "autoscaling_config"} & set(deployment_options[name]) for name in teachers
    )
    least = sum(teacher.autoscaling.min_replicas for teacher in teachers.values())
    most = sum(teacher.most_replicas for teacher in teachers.values())
    group = worker_group(builds["base"], "teachers")
    (worker,) = containers(group["template"])
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert group["minReplicas"] * gpus_per_pod >= least
    assert group["maxReplicas"] * gpus_per_pod >= most
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # Pods beyond the minimum come only from Ray's autoscaler, when Serve asks for more replicas.
    cluster = ray_cluster_spec(by_kind_and_name(builds["base"])["RayService", "ekd-teachers"])
    assert cluster["enableInTreeAutoscaling"] is True


def test_cpu_overlay_asks_for_no_gpu_and_runs_the_cpu_image(builds):
    assert "nvidia.com/gpu" not in json.dumps(builds["cpu"])
    assert all(
        deployment["ray_actor_options"].get("num_gpus", 0) == 0
        for deployment in serve_deployments(builds["cpu"]).values()
    )
    rayservices = {
        overlay: by_kind_and_name(builds[overlay])["RayService", "ekd-teachers"] for overlay in OVERLAYS
    }
    for overlay, image in (("base", "ekd:cuda"), ("cpu", "ekd:cpu")):
        # One image, hence one Python, across the Ray cluster.
        images = {c["image"] for t in pod_templates(rayservices[overlay]).values() for c in containers(t)}
        assert images == {image}


def test_only_the_ingress_group_offers_the_ingress_resource(builds, applications):
    for overlay in OVERLAYS:
        ingress = serve_deployments(builds[overlay])[deployments.INGRESS_DEPLOYMENT]
        assert ingress["ray_actor_options"]["resources"] == {INGRESS_RESOURCE: 1}
        assert "num_replicas" not in ingress  # the config's grpc.replicas decide
        cluster = ray_cluster_spec(by_kind_and_name(builds[overlay])["RayService", "ekd-teachers"])
        offered = {}
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            # rayStartParams.resources is a quoted JSON string, as ray start receives it on the command line.
            resources = json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))
            offered[group.get("groupName", "head")] = resources.get(INGRESS_RESOURCE, 0)
        assert offered == {"head": 0, "teachers": 0, "grpc-ingress": 1}
        # One replica per ingress pod: each binds the fixed ports in its own pod.
        grpc = applications[overlay]["config"].grpc
        group = worker_group(builds[overlay], "grpc-ingress")
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == grpc.replicas
        assert grpc.replicas == 1 or grpc.max_replicas_per_node == 1
        # Nothing else lands on the head or the ingress worker.
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert worker_group(builds[overlay], "grpc-ingress")["rayStartParams"]["num-cpus"] == "0"


# --- wiring ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_service_reaches_the_ingress_pods_once_they_serve(builds, applications, overlay):
    config = applications[overlay]["config"]
    objects = by_kind_and_name(builds[overlay])
    service = objects["Service", "ekd-teachers-grpc"]
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert ports["serve-grpc"]["port"] == config.grpc.port == 50051
    templates = pod_templates(objects["RayService", "ekd-teachers"])
    selected = [
        role
        for role, template in templates.items()
        if selects(service["spec"]["selector"], template["metadata"]["labels"])
    ]
    assert selected == ["grpc-ingress"]
    (ingress,) = containers(templates["grpc-ingress"])
    container_ports = {port["name"]: port["containerPort"] for port in ingress["ports"]}
    assert container_ports[ports["serve-grpc"]["targetPort"]] == config.grpc.port
    assert container_ports[ports["ekd-metrics"]["targetPort"]] == config.metrics_port
    # The image's health client asks grpc.health.v1 about the whole server, over TLS (Kubernetes's native
    # gRPC probe cannot).
    command = ingress["readinessProbe"]["exec"]["command"]
    assert command[:4] == ["python", "-m", "services.rpc.healthcheck", f"127.0.0.1:{config.grpc.port}"]


def test_ray_pods_keep_what_kuberay_relies_on(builds):
    for overlay in OVERLAYS:
        templates = pod_templates(by_kind_and_name(builds[overlay])["RayService", "ekd-teachers"])
        (head,) = containers(templates["head"])
        # KubeRay deploys the application once the head is Ready, so its readiness must not wait for it.
        assert "readinessProbe" not in head
        # Without a head port named "serve", KubeRay builds no <name>-serve-svc and the RayService never
        # becomes ready.
        assert {"name": "serve", "containerPort": 8000} in head["ports"]
        # KubeRay's head service selects app.kubernetes.io/name=kuberay, which a pod label would override.
        for template in templates.values():
            assert "app.kubernetes.io/name" not in template["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_the_metrics_port(builds, overlay):
    objects = by_kind_and_name(builds[overlay])
    monitor = objects["ServiceMonitor", "ekd-teachers"]
    monitored = [
        obj
        for obj in builds[overlay]
        if obj["kind"] == "Service"
        and selects(monitor["spec"]["selector"]["matchLabels"], obj["metadata"]["labels"])
    ]
    assert [service["metadata"]["name"] for service in monitored] == ["ekd-teachers-grpc"]
    port_names = {port["name"] for port in monitored[0]["spec"]["ports"]}
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["ekd-metrics"]
    assert "ekd-metrics" in port_names


def test_every_cache_user_gets_the_password_from_the_secret(builds, jobs):
    objects = by_kind_and_name(builds["base"])
    secret = objects["Secret", "ekd-redis"]
    password = secret["stringData"]["password"]
    redis_service = objects["Service", "ekd-redis"]
    (redis_port,) = redis_service["spec"]["ports"]
    expected_uri = f"redis://:$(REDIS_PASSWORD)@{redis_service['metadata']['name']}:{redis_port['port']}/0"
    ray_objects = [
        obj for obj in builds["base"] + builds["cpu"] + jobs if obj["kind"] in ("RayService", "RayJob")
    ]
    for obj in ray_objects:
        for role, template in pod_templates(obj).items():
            if role == "submitter":
                continue
            for container in containers(template):
                env = env_of(container)
                names = [name for name, _ in env]
                # Kubernetes expands $(REDIS_PASSWORD) only from variables defined before.
                assert names.index("REDIS_PASSWORD") < names.index("EKD_CACHE_URI"), (obj["kind"], role)
                entries = dict(env)
                assert entries["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                    "name": "ekd-redis",
                    "key": "password",
                }
                assert entries["EKD_CACHE_URI"]["value"] == expected_uri
    # The password itself appears nowhere but in the Secret.
    everything_else = [obj for obj in builds["base"] + jobs if obj is not secret]
    assert password not in json.dumps(everything_else)


def redis_bytes(size: str) -> int:
    """A redis.conf memory size ("96gb") or Kubernetes quantity ("104Gi") in bytes."""
    units = {"gb": 2**30, "mb": 2**20, "Gi": 2**30, "Mi": 2**20}
    for unit, factor in units.items():
        if size.endswith(unit):
            return int(float(size.removesuffix(unit)) * factor)
    raise ValueError(f"unknown unit in {size!r}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_requires_the_password_and_evicts_lru_at_its_memory_limit(builds, overlay):
    objects = by_kind_and_name(builds[overlay])
    statefulset = objects["StatefulSet", "ekd-redis"]
    (redis,) = containers(statefulset["spec"]["template"])
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert dict(env_of(redis))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "ekd-redis",
        "key": "password",
    }
    config_path = redis["args"][1]
    (mount,) = [m for m in redis["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = objects["ConfigMap", volume["configMap"]["name"]]
    lines = config_map["data"][Path(config_path).name].splitlines()
    directives = dict(line.split(maxsplit=1) for line in lines if line and not line.startswith("#"))
    assert directives["maxmemory-policy"] == "allkeys-lru" and keeps_compact_buckets_small(directives)
    # The pod has room for the cache and Redis's own overhead.
    assert redis_bytes(directives["maxmemory"]) < redis_bytes(redis["resources"]["requests"]["memory"])
    assert statefulset["spec"]["serviceName"] == "ekd-redis"
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert selects(objects["Service", "ekd-redis"]["spec"]["selector"], pod_labels)


def test_teacher_workers_read_checkpoints_from_the_models_volume(builds, applications):
    objects = by_kind_and_name(builds["base"])
    claim = objects["PersistentVolumeClaim", "ekd-models"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    template = worker_group(builds["base"], "teachers")["template"]
    (worker,) = containers(template)
    (mount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "ekd-models"
    for application in applications.values():
        assert all(t.checkpoint.startswith("/models/") for t in application["config"].teachers)


def test_distill_job_asks_the_teacher_service(builds, jobs):
    (rayjob,) = [obj for obj in jobs if obj["kind"] == "RayJob"]
    steps = [shlex.split(step) for step in rayjob["spec"]["entrypoint"].split("&&")]
    assert steps[0] == ["cd", "/app"]
    command = steps[-1]
    assert command[:2] == ["ekd", "distill"]
    assert repo_path(command[2]).is_file()
    service = by_kind_and_name(builds["base"])["Service", "ekd-teachers-grpc"]
    (grpc_port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "serve-grpc"]
    assert command[command.index("--teacher-service") + 1] == f"{service['metadata']['name']}:{grpc_port}"
    output_dir = command[command.index("--output-dir") + 1]
    (head,) = containers(pod_templates(rayjob)["head"])
    assert output_dir in {mount["mountPath"] for mount in head["volumeMounts"]}
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert "workerGroupSpecs" not in rayjob["spec"]["rayClusterSpec"]  # the run is one driver process


def test_claims_used_by_pods_exist(builds, jobs):
    for overlay in OVERLAYS:
        claims = {
            obj["metadata"]["name"] for obj in builds[overlay] if obj["kind"] == "PersistentVolumeClaim"
        }
        for obj in builds[overlay] + jobs:
            for template in pod_templates(obj).values():
                for volume in template["spec"].get("volumes", []):
                    if "persistentVolumeClaim" in volume:
                        assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_ray_containers_run_as_the_images_user(builds, jobs):
    for obj in builds["base"] + builds["cpu"] + jobs:
        if obj["kind"] in ("RayService", "RayJob", "Job"):
            for template in pod_templates(obj).values():
                context = template["spec"]["securityContext"]
                user = (context["runAsNonRoot"], context["runAsUser"], context["runAsGroup"])
                assert user == (True, 10001, 10001)


def test_base_redis_holds_the_headline_recipes_soft_label_bank(builds):
    (config_map,) = [obj for obj in builds["base"] if obj["kind"] == "ConfigMap"]
    lines = config_map["data"]["redis.conf"].splitlines()
    directives = dict(line.split(maxsplit=1) for line in lines if line and not line.startswith("#"))
    recipe = yaml.safe_load(HEADLINE_RECIPE.read_text())
    entries = IMAGENET_TRAIN_IMAGES * recipe["data"]["views"] * len(recipe["teachers"])
    assert entries * BYTES_PER_LOGITS_ENTRY <= redis_bytes(directives["maxmemory"])


# --- transport security ------------------------------------------------------------------------------------

TLS_MOUNT = "/etc/ekd/tls"
TOKEN_MOUNT = "/etc/ekd/token"


def mounted_secrets(template: dict, container: dict) -> dict[str, str]:
    """mount path -> name of the Secret mounted there."""
    volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
    return {
        mount["mountPath"]: volumes[mount["name"]]["secret"]["secretName"]
        for mount in container.get("volumeMounts", [])
        if "secret" in volumes[mount["name"]]
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_serves_tls_and_requires_the_token_from_mounted_secrets(builds, overlay):
    objects = by_kind_and_name(builds[overlay])
    template = pod_templates(objects["RayService", "ekd-teachers"])["grpc-ingress"]
    (ingress,) = containers(template)
    env = {name: entry["value"] for name, entry in env_of(ingress) if "value" in entry}
    assert env["EKD_TLS_CERT_FILE"] == f"{TLS_MOUNT}/tls.crt"
    assert env["EKD_TLS_KEY_FILE"] == f"{TLS_MOUNT}/tls.key"
    assert env["EKD_AUTH_TOKEN_FILE"] == f"{TOKEN_MOUNT}/token"
    assert env["EKD_TLS_CA_FILE"] == f"{TLS_MOUNT}/ca.crt"  # the readiness probe's client
    # The probe dials 127.0.0.1: it checks the certificate against the name clients use.
    assert env["EKD_TLS_SERVER_NAME"] == objects["Service", "ekd-teachers-grpc"]["metadata"]["name"]
    assert mounted_secrets(template, ingress) == {
        TLS_MOUNT: "ekd-teacher-tls",
        TOKEN_MOUNT: "ekd-teacher-token",
    }
    assert "EKD_AUTH_TOKEN" not in env  # only ever the file


def test_teacher_clients_trust_the_ca_and_send_the_token(jobs):
    (distill,) = [obj for obj in jobs if obj["kind"] == "RayJob"]
    template = pod_templates(distill)["head"]
    (head,) = containers(template)
    env = {name: entry.get("value") for name, entry in env_of(head)}
    assert env["EKD_TLS_CA_FILE"] == f"{TLS_MOUNT}/ca.crt"
    assert env["EKD_AUTH_TOKEN_FILE"] == f"{TOKEN_MOUNT}/token"
    assert mounted_secrets(template, head) == {TLS_MOUNT: "ekd-teacher-tls", TOKEN_MOUNT: "ekd-teacher-token"}
    (ca_volume,) = [
        v for v in template["spec"]["volumes"] if v.get("secret", {}).get("secretName") == "ekd-teacher-tls"
    ]
    assert ca_volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the server's key


def test_the_token_appears_only_in_its_secret(builds, jobs):
    objects = by_kind_and_name(builds["base"])
    secret = objects["Secret", "ekd-teacher-token"]
    token = secret["stringData"]["token"]
    everything_else = [obj for obj in builds["base"] + builds["cpu"] + jobs if obj != secret]
    assert token not in json.dumps(everything_else)
    for obj in builds["base"] + builds["cpu"] + jobs:
        for template in pod_templates(obj).values() if obj["kind"] in CUSTOM_KINDS else []:
            for container in containers(template):
                for name, entry in env_of(container):
                    assert name not in {"EKD_AUTH_TOKEN", "EKD_TLS_KEY"}, (obj["kind"], name)
                    assert "BEGIN" not in str(entry.get("value", ""))  # no PEM inline


def test_cert_manager_certificate_names_the_service_and_fills_the_tls_secret(builds):
    documents = load_documents(REPO / "deploy" / "cert-manager" / "certificate.yaml")
    service = by_kind_and_name(builds["base"])["Service", "ekd-teachers-grpc"]["metadata"]["name"]
    (server,) = [
        doc
        for doc in documents
        if doc["kind"] == "Certificate" and doc["spec"]["secretName"] == "ekd-teacher-tls"
    ]
    assert service in server["spec"]["dnsNames"]
    issuers = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "Issuer"}
    assert server["spec"]["issuerRef"]["name"] in issuers
