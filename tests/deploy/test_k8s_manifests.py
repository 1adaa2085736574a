"""Offline checks of the Kubernetes manifests in deploy/k8s.

Every object is validated against the Kubernetes API schema of a fixed version (the
kubernetes-validate package bundles the schemas; strict: unknown fields are errors), KEDA's
custom resources against the openAPIV3Schema of the KEDA CRDs kept in deploy/k8s/crds (made
strict the same way). The other tests check what a schema cannot: references between objects,
probes, resources, broker permissions against the mesh's real queue and exchange names.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.names import Names

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
CRDS = K8S / "crds"
KUBERNETES_VERSION = "1.30"
NAMESPACE = "exegpt"
MESH = ("scheduler", "worker", "gateway")  # Deployments running the exegpt image
CUSTOM_RESOURCES = {  # (apiVersion, kind) -> the CRD file defining it
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


# ==== loading ====================================================================================
def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) for every YAML document of every manifest."""
    found = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path.name, doc))
    return tuple(found)


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def workloads() -> list[dict[str, Any]]:
    return objects("Deployment") + objects("StatefulSet")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def container(workload_name: str) -> dict[str, Any]:
    (only,) = pod_spec(named("Deployment", workload_name))["containers"]
    return only


def port_names(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def config_data() -> dict[str, str]:
    return named("ConfigMap", "exegpt-config")["data"]


def secret_data(name: str) -> dict[str, str]:
    return named("Secret", name)["stringData"]


def definitions(passwords: str = "secret-1") -> dict[str, Any]:
    """RabbitMQ's definitions file as the init container renders it."""
    template = named("ConfigMap", "rabbitmq-definitions")["data"]["definitions.json"]
    return json.loads(re.sub(r"@[A-Z]+_PASSWORD@", passwords, template))


def doc_id(entry: tuple[str, dict[str, Any]]) -> str:
    file, doc = entry
    return f"{file}:{doc['kind']}/{doc['metadata']['name']}"


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)


# ==== schemas ====================================================================================
def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the API server would prune them."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for item in node:
                close(item)

    close(schema)
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / CUSTOM_RESOURCES[api_version, kind]).read_text())
    group, version = api_version.split("/")
    assert crd["kind"] == "CustomResourceDefinition"
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"]
    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))


def validate(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CUSTOM_RESOURCES:
        crd_validator(*key).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("entry", documents(), ids=doc_id)
def test_object_is_valid_against_its_schema(entry):
    _, doc = entry
    validate(doc)
    if doc["kind"] not in CLUSTER_SCOPED:
        assert doc["metadata"].get("namespace") == NAMESPACE


def test_validation_refuses_an_unknown_field():
    """Strict mode is on, for built-in kinds and for custom resources."""
    deployment = copy.deepcopy(named("Deployment", "worker"))
    pod_spec(deployment)["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(named("ScaledObject", "worker"))
    scaled["spec"]["maxReplicas"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]


def test_crd_files_are_keda_crds():
    for (api_version, kind), file in CUSTOM_RESOURCES.items():
        crd = yaml.safe_load((CRDS / file).read_text())
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.keda.sh"
        assert crd_validator(api_version, kind).schema["type"] == "object"


# ==== workloads ==================================================================================
def test_every_container_has_requests_and_limits():
    for workload in workloads():
        for c in all_containers(workload):
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), (
                    f"{workload['metadata']['name']}/{c['name']}: resources.{part} needs cpu and memory"
                )


def test_mesh_roles_run_the_exegpt_image_with_their_command():
    expected = {
        "scheduler": ["scheduler"],
        "worker": ["worker"],
        "gateway": ["gateway", "--host", "0.0.0.0", "--port", "8000"],
    }
    for role, args in expected.items():
        c = container(role)
        assert c["image"] == "localhost/exegpt:latest"
        assert "command" not in c  # the image's entrypoint is exegpt
        assert c["args"] == args


@pytest.mark.parametrize("role", MESH)
def test_mesh_probes_use_health_routes_on_a_declared_port(role):
    c = container(role)
    expected_port = "http" if role == "gateway" else "ops"
    ports = port_names(c)
    assert expected_port in ports
    probes = {"livenessProbe": "/health/live", "readinessProbe": "/health/ready"}
    if role == "worker":
        probes["startupProbe"] = "/health/live"  # model loading must not trip liveness
    for probe, path in probes.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, f"{role} {probe}"
        assert get["port"] == expected_port, f"{role} {probe} must name the {expected_port} port"
    if role == "worker":
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_a_hung_worker_is_killed_within_ten_seconds():
    """Missed probes (each waits its timeout), then the probe's own grace, not the pod's drain."""
    live = container("worker")["livenessProbe"]
    assert (
        live["periodSeconds"] * live["failureThreshold"]
        + live["timeoutSeconds"]
        + live["terminationGracePeriodSeconds"]
        <= 10
    )


def test_ops_port_of_the_config_is_the_ops_container_port():
    ops_port = int(config_data()["EXEGPT_OPS_PORT"])
    for role in ("scheduler", "worker"):
        assert port_names(container(role))["ops"] == ops_port
    gateway = container("gateway")
    assert port_names(gateway)["http"] == int(gateway["args"][gateway["args"].index("--port") + 1])


def test_workers_outlast_their_drain():
    spec = pod_spec(named("Deployment", "worker"))
    assert spec["terminationGracePeriodSeconds"] == 45  # drain_timeout_s (30) plus the close
    resources = container("worker")["resources"]
    assert int(resources["requests"]["cpu"]) >= int(config_data()["EXEGPT_THREADS"])


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi)", quantity).groups()
    return float(number) * (1024 if unit == "Gi" else 1)


def test_workers_carry_what_the_nixl_kv_data_plane_needs():
    """NIXL (UCX) hands KV caches between workers: its staging pool fits the memory limit beside a
    memory-backed /dev/shm for the shared-memory transports, and its TCP listener range is the
    container's "kv" ports."""
    from common.config import MeshConfig

    config = config_data()
    MeshConfig(kv_transport=config["EXEGPT_KV_TRANSPORT"], kv_staging_mb=int(config["EXEGPT_KV_STAGING_MB"]))
    assert config["EXEGPT_KV_TRANSPORT"] == "nixl"
    worker = container("worker")
    shm = [m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    volumes = {v["name"]: v for v in pod_spec(named("Deployment", "worker"))["volumes"]}
    assert len(shm) == 1 and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    shm_mib = mebibytes(volumes[shm[0]["name"]]["emptyDir"]["sizeLimit"])
    assert shm_mib >= 256
    limit, request = (mebibytes(worker["resources"][k]["memory"]) for k in ("limits", "requests"))
    assert limit - request >= shm_mib + int(config["EXEGPT_KV_STAGING_MB"])  # both count against the limit
    env = {e["name"]: e.get("value") for e in worker["env"]}
    low, high = (int(p) for p in env["UCX_TCP_PORT_RANGE"].split("-"))
    kv_ports = sorted(port for name, port in port_names(worker).items() if name.startswith("kv"))
    assert kv_ports == list(range(low, high + 1))


def test_workload_selectors_match_their_own_pods():
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels(workload).items(), workload["metadata"]["name"]


def test_every_service_selects_pods_and_their_ports():
    for service in objects("Service"):
        selector = service["spec"]["selector"]
        chosen = [w for w in workloads() if selector.items() <= pod_labels(w).items()]
        assert chosen, f"Service {service['metadata']['name']} selects no pod template"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in chosen:
                declared = {}
                for c in pod_spec(workload)["containers"]:
                    declared |= port_names(c)
                assert target in declared or target in declared.values(), (
                    f"Service {service['metadata']['name']} port {target} is not a container port"
                )


def test_statefulsets_are_governed_by_headless_services():
    for sts in objects("StatefulSet"):
        service = named("Service", sts["spec"]["serviceName"])
        assert service["spec"].get("clusterIP") == "None"


def test_worker_disruption_budget_selects_workers_only():
    (pdb,) = objects("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    chosen = [w["metadata"]["name"] for w in workloads() if selector.items() <= pod_labels(w).items()]
    assert chosen == ["worker"]


def test_secret_and_configmap_references_resolve():
    for workload in workloads():
        spec = pod_spec(workload)
        for c in all_containers(workload):
            for source in c.get("envFrom", []):
                named("ConfigMap", source["configMapRef"]["name"])
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_data(ref["name"]), f"{ref['name']} has no {ref['key']}"
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                named("ConfigMap", volume["configMap"]["name"])
        if "serviceAccountName" in spec:
            named("ServiceAccount", spec["serviceAccountName"])


# ==== broker credentials =========================================================================
def container_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in order,
    $(VAR) expanded from what is defined before it."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env |= named("ConfigMap", source["configMapRef"]["name"])["data"]
    for item in c.get("env", []):
        if "value" in item:

            def expand(match: re.Match[str], *, item: dict[str, Any] = item) -> str:
                assert match.group(1) in env, f"{item['name']}: $({match.group(1)}) is not defined before it"
                return env[match.group(1)]

            env[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_data(ref["name"])[ref["key"]]
    return env


@pytest.mark.parametrize("role", MESH)
def test_each_role_connects_as_its_own_broker_user(role):
    env = container_env(container(role))
    assert "EXEGPT_AMQP_URL" not in config_data()
    url = urlsplit(env["EXEGPT_AMQP_URL"])
    own = secret_data(f"exegpt-broker-{role}")
    assert url.scheme == "amqp"
    assert (url.username, url.password) == (own["username"], own["password"])
    assert own["username"] == f"exegpt-{role}"
    rabbitmq = named("Service", url.hostname)
    assert url.port in [p["port"] for p in rabbitmq["spec"]["ports"]]
    assert env["EXEGPT_REDIS_URL"] == "redis://redis:6379/0"
    named("Service", urlsplit(env["EXEGPT_REDIS_URL"]).hostname)
    assert env["EXEGPT_NAMESPACE"] == NAMESPACE


def test_no_guest_credentials_anywhere():
    users = [(u["name"], u["password"]) for u in definitions(passwords="@")["users"]]
    secrets = [value for s in objects("Secret") for value in s["stringData"].values()]
    urls = [s for _, doc in documents() for s in walk_strings(doc) if "amqp://" in s]
    creds = [(m.group(1), m.group(2)) for s in urls for m in re.finditer(r"amqp://([^:@/]*):([^@/]*)@", s)]
    assert urls and creds
    for user, password in users + creds:
        assert "guest" not in user.lower() and "guest" not in password.lower()
    for value in secrets:
        assert "guest" not in value.lower()
    conf = named("ConfigMap", "rabbitmq-config")["data"]["rabbitmq.conf"]
    assert re.search(r"^loopback_users\.guest = true$", conf, re.M)
    assert "default_user" not in conf and "default_pass" not in conf


def test_secret_passwords_are_placeholders_to_replace():
    for secret in objects("Secret"):
        for key, value in secret["stringData"].items():
            if "password" in key or key.endswith("keys"):
                assert value.startswith("change-me-")
    keda = secret_data("exegpt-broker-keda")
    host = urlsplit(keda["host"])
    assert (host.username, host.password) == (keda["username"], keda["password"])
    assert host.hostname == f"rabbitmq.{NAMESPACE}.svc"  # KEDA runs in another namespace


def test_broker_definitions_render_from_the_role_secrets():
    rabbitmq = named("StatefulSet", "rabbitmq")
    (init,) = pod_spec(rabbitmq)["initContainers"]
    script = init["args"][0]
    assert "$(" not in script  # the kubelet would expand it before the shell sees it
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"]}
    template = named("ConfigMap", "rabbitmq-definitions")["data"]["definitions.json"]
    placeholders = set(re.findall(r"@([A-Z]+_PASSWORD)@", template))
    assert placeholders == set(env)
    users = {u["name"]: u for u in json.loads(re.sub(r"@[A-Z]+_PASSWORD@", "x", template))["users"]}
    for var, ref in env.items():
        assert ref["key"] == "password" and f"@{var}@" in script
        owner = secret_data(ref["name"])["username"]
        assert users[owner]["password"] == "x"
        assert f'"name": "{owner}", "password": "@{var}@"' in template
    # the file the init container writes is the one rabbitmq.conf loads
    conf = named("ConfigMap", "rabbitmq-config")["data"]["rabbitmq.conf"]
    (loaded,) = re.findall(r"^load_definitions = (\S+)$", conf, re.M)
    assert f"> {loaded}" in script
    main = pod_spec(rabbitmq)["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts[str(Path(loaded).parent)] == "definitions"
    env = {e["name"]: e["value"] for e in main["env"]}
    config = named("ConfigMap", "rabbitmq-config")["data"]
    for var, key in (("RABBITMQ_CONFIG_FILE", "rabbitmq.conf"), ("RABBITMQ_ENABLED_PLUGINS_FILE", "enabled_plugins")):
        path = Path(env[var])
        assert mounts[str(path.parent)] == "config" and path.name == key and key in config
    assert main["command"] == ["rabbitmq-server"]  # not the image's entrypoint (its own admin user)
    assert "rabbitmq_prometheus" in config["enabled_plugins"]
    assert main["readinessProbe"]["exec"]["command"] == ["rabbitmq-diagnostics", "-q", "ping"]
    assert "/var/lib/rabbitmq" in mounts
    assert rabbitmq["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == mounts["/var/lib/rabbitmq"]


# What each role does on the broker (common/transport/rabbit.py and the services), as
# (permission, resource name). RabbitMQ matches a permission's regex anywhere in the name.
N = Names(NAMESPACE)
PID = "worker-worker-6d5f8c9b7-x2k4q-1-ab12"  # a process id: role-host-pid-suffix
ON_CONNECT = [
    ("configure", N.dead_exchange),
    ("configure", N.dead_queue),
    ("write", N.dead_queue),
    ("read", N.dead_exchange),
]


def work_queue(name: str) -> list[tuple[str, str]]:
    """Declaring a durable queue with x-dead-letter-exchange."""
    return [("configure", name), ("read", name), ("write", N.dead_exchange)]


def subscription(exchange: str, queue: str) -> list[tuple[str, str]]:
    """Declare the fanout exchange, an exclusive queue, bind and consume."""
    return [("configure", exchange), ("configure", queue), ("write", queue), ("read", exchange), ("read", queue)]


NEEDS = {
    "exegpt-scheduler": ON_CONNECT
    + work_queue(N.scheduler_queue)
    + subscription(N.status_exchange, N.status_queue(PID))
    + [("configure", N.control_exchange), ("write", N.control_exchange)],
    "exegpt-gateway": ON_CONNECT
    + work_queue(N.encode_queue)
    + work_queue(N.scheduler_queue)
    + work_queue(N.jobs_queue)
    + [
        ("configure", N.abort_exchange),
        ("configure", N.events_queue(PID)),
        ("read", N.events_queue(PID)),
        ("write", "amq.default"),  # EncodeWork, PinSchedule, job results: published by queue name
        ("write", N.abort_exchange),
    ],  # Abort, when a client goes away
    "exegpt-worker": ON_CONNECT
    + work_queue(N.encode_queue)
    + work_queue(N.handoff_queue)
    + subscription(N.control_exchange, N.control_queue(PID))
    + subscription(N.abort_exchange, N.abort_queue(PID))
    + [("configure", N.status_exchange), ("write", N.status_exchange), ("write", "amq.default")],
    "exegpt-keda": [],  # a passive declare needs no permission
}
REFUSED = {
    "exegpt-scheduler": [
        ("write", "amq.default"),
        ("write", N.status_exchange),
        ("read", N.encode_queue),
        ("read", N.handoff_queue),
        ("read", N.events_queue(PID)),
        ("configure", N.encode_queue),
        ("configure", N.control_queue(PID)),
    ],
    "exegpt-gateway": [
        ("read", N.handoff_queue),
        ("read", N.control_queue(PID)),
        ("read", N.status_queue(PID)),
        ("read", N.control_exchange),
        ("read", N.status_exchange),
        ("write", N.status_exchange),
        ("configure", N.handoff_queue),
        ("configure", N.control_queue(PID)),
        ("write", N.control_exchange),
        ("configure", N.control_exchange),
    ],  # schedules: the scheduler's
    "exegpt-worker": [
        ("write", N.control_exchange),
        ("write", N.abort_exchange),  # scheduler's, gateways'
        ("read", N.scheduler_queue),
        ("read", N.jobs_queue),
        ("read", N.events_queue(PID)),
        ("read", N.status_queue(PID)),
        ("configure", N.scheduler_queue),
        ("configure", N.events_queue(PID)),
        ("configure", N.status_queue(PID)),
    ],
    "exegpt-keda": [
        (perm, name)
        for perm in ("configure", "write", "read")
        for name in (N.encode_queue, N.control_exchange, "amq.default")
    ],
}
EVERYONE_REFUSED = [
    ("configure", "amq.default"),
    ("write", "amq.topic"),
    ("configure", "other.encode"),
    ("read", "other.encode"),
    ("configure", f"{N.control_queue(PID)}.x"),
    ("configure", "xexegpt.encode"),
    ("configure", f"{N.encode_queue}x"),
]


def permissions() -> dict[str, dict[str, str]]:
    defs = definitions()
    assert [v["name"] for v in defs["vhosts"]] == ["/"]
    return {p["user"]: p for p in defs["permissions"] if p["vhost"] == "/"}


@pytest.mark.parametrize("user", sorted(NEEDS))
def test_broker_permissions_let_each_role_work_and_no_more(user):
    granted = permissions()[user]
    for perm, name in NEEDS[user]:
        assert re.search(granted[perm], name), f"{user} needs {perm} on {name}"
    for perm, name in REFUSED[user] + EVERYONE_REFUSED:
        assert not re.search(granted[perm], name), f"{user} must not have {perm} on {name}"


def test_every_broker_user_has_a_secret_and_permissions():
    users = {u["name"] for u in definitions()["users"]}
    assert users == set(permissions()) == set(NEEDS)
    assert users == {s["stringData"]["username"] for s in objects("Secret") if "username" in s["stringData"]}
    for user in definitions()["users"]:
        assert user["tags"] == ""  # no management or administrator rights


# ==== autoscaling ================================================================================
def test_scaled_object_scales_workers_on_the_encode_queue():
    (scaled,) = objects("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    named("Deployment", target["name"])
    assert target["name"] == "worker"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 8)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == N.encode_queue
    assert trigger["metadata"]["mode"] == "QueueLength" and float(trigger["metadata"]["value"]) > 0
    auth = named("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    assert urlsplit(secret_data(ref["name"])[ref["key"]]).scheme == "amqp"


# ==== monitoring =================================================================================
def scrape_configs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(named("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    return {job["job_name"]: job for job in config["scrape_configs"]}


def kept(job: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a target with these discovery labels survives the job's keep rules."""
    for rule in job["relabel_configs"]:
        if rule.get("action") == "keep":
            value = ";".join(labels.get(label, "") for label in rule["source_labels"])
            if not re.fullmatch(rule["regex"], value):  # Prometheus anchors its regexes
                return False
    return True


def discovery_labels(workload: dict[str, Any], port: str) -> dict[str, str]:
    labels = {
        "__meta_kubernetes_pod_container_port_name": port,
        "__meta_kubernetes_namespace": workload["metadata"]["namespace"],
    }
    for key, value in pod_labels(workload).items():
        labels["__meta_kubernetes_pod_label_" + re.sub(r"[^A-Za-z0-9_]", "_", key)] = value
    return labels


def test_prometheus_scrapes_the_metrics_port_of_every_mesh_pod():
    job = scrape_configs()["exegpt"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [NAMESPACE]
    for role in MESH:
        workload = named("Deployment", role)
        assert pod_labels(workload)["app.kubernetes.io/part-of"] == "exegpt"
        metrics_port = container(role)["readinessProbe"]["httpGet"]["port"]
        assert kept(job, discovery_labels(workload, metrics_port)), role
    for other in ("prometheus", "rabbitmq", "redis"):
        workload = next(w for w in workloads() if w["metadata"]["name"] == other)
        for c in pod_spec(workload)["containers"]:
            for port in port_names(c):
                assert not kept(job, discovery_labels(workload, port)), f"{other} port {port}"
    rabbitmq = named("StatefulSet", "rabbitmq")
    assert kept(scrape_configs()["rabbitmq"], discovery_labels(rabbitmq, "prometheus"))


def test_prometheus_may_list_and_watch_pods_in_the_namespace():
    deployment = named("Deployment", "prometheus")
    account = pod_spec(deployment)["serviceAccountName"]
    binding = named("RoleBinding", "exegpt-prometheus")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding["subjects"]
    role = named(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    assert any("pods" in rule["resources"] and {"get", "list", "watch"} <= set(rule["verbs"]) for rule in role["rules"])
    c = pod_spec(deployment)["containers"][0]
    assert c["image"] == "localhost/exegpt-prometheus:latest"
    config_mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert f"--config.file={config_mount['mountPath']}/prometheus.yml" in c["args"]


def test_work_queues_are_quorum_queues_with_a_valid_setting():
    from common.config import MeshConfig

    assert config_data()["EXEGPT_QUEUE_TYPE"] == "quorum"
    assert MeshConfig(queue_type=config_data()["EXEGPT_QUEUE_TYPE"]).queue_type == "quorum"


def test_every_gateway_replica_keeps_batches_on_one_shared_volume():
    gateway = named("Deployment", "gateway")
    env = container_env(container("gateway"))
    mounts = {m["name"]: m["mountPath"] for m in container("gateway").get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod_spec(gateway).get("volumes", [])}
    (name,) = [n for n, path in mounts.items() if path == env["EXEGPT_BATCH_DIR"]]
    claim = named("PersistentVolumeClaim", volumes[name]["persistentVolumeClaim"]["claimName"])
    assert gateway["spec"]["replicas"] > 1 and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod_spec(gateway)["securityContext"]["fsGroup"] == pod_spec(gateway)["securityContext"]["runAsUser"]
