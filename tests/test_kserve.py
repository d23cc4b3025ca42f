"""docker/kserve/: the ServingRuntime and InferenceServices against KServe's API types (the kserve
wheel, tests/kserve_schema.py), wired to each other and to real settings, and the runtime's
container arguments served for real: the model under the InferenceService's name, REST and gRPC."""

from __future__ import annotations

import copy
import importlib.metadata
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

yaml = pytest.importorskip("yaml", reason="the deployment checks need PyYAML (the `test` extra)")
jsonschema = pytest.importorskip("jsonschema", reason="the deployment checks need jsonschema (the `test` extra)")

from offramp.cli import build_parser  # noqa: E402
from server.bundle import load_bundles  # noqa: E402
from server.cli import settings_from_args  # noqa: E402
from server.errors import BundleError  # noqa: E402
from tests import kserve_schema  # noqa: E402
from tests.fakes import ServerProcess, build_onnx_bundle  # noqa: E402

KSERVE = Path(__file__).resolve().parents[1] / "docker" / "kserve"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri


def kserve_installed() -> bool:
    try:
        return importlib.metadata.version("kserve") == kserve_schema.KSERVE_VERSION
    except importlib.metadata.PackageNotFoundError:
        return False


needs_kserve = pytest.mark.skipif(
    not kserve_installed(), reason=f"`make test` installs kserve=={kserve_schema.KSERVE_VERSION} --no-deps")


def doc(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((KSERVE / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def runtime_container() -> dict[str, Any]:
    containers = doc("servingruntime.yaml")["spec"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"]  # the name KServe merges into
    return containers[0]


def runtime_args(model: str) -> list[str]:
    """The container's arguments with KServe's template filled in, as the pod runs them."""
    return [a.replace("{{.Name}}", model) for a in runtime_container()["args"]]


@needs_kserve
@pytest.mark.parametrize("name", sorted(p.name for p in KSERVE.glob("*.yaml")))
def test_manifest_validates_against_the_kserve_api_types(name: str) -> None:
    kserve_schema.validate(doc(name))


@needs_kserve
@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["spec"]["containers"][0].update(portz=[]), "'portz' was unexpected"),
    (lambda d: d["spec"].update(supportedModelFormat=d["spec"].pop("supportedModelFormats")), "supportedModelFormat"),
    (lambda d: d["spec"].pop("containers"), "'containers' is a required property"),
    (lambda d: d["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(port=[8080]), "[8080]"),
    (lambda d: d["spec"].update(multiModel="no"), "'no' is not of type 'boolean'"),
    (lambda d: d.update(kind="ServingRuntimes"), "is not one of"),
])
def test_the_schema_refuses_misspelt_missing_and_mistyped_fields(mutate: Any, where: str) -> None:
    bad = copy.deepcopy(doc("servingruntime.yaml"))
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError) as err:
        kserve_schema.validate(bad)
    assert where in str(err.value)


@needs_kserve
@pytest.mark.parametrize("path, field", [(["spec", "predictor", "model"], "modelFormat"),
                                         (["spec", "predictor", "model", "modelFormat"], "name")])
def test_an_inference_service_missing_a_required_field_is_refused(path: list[str], field: str) -> None:
    bad = copy.deepcopy(doc("inferenceservice.yaml"))
    node = bad
    for key in path:
        node = node[key]
    del node[field]
    with pytest.raises(jsonschema.ValidationError, match=f"'{field}' is a required property"):
        kserve_schema.validate(bad)


def test_runtime_arguments_are_valid_settings_on_kserves_ports() -> None:
    args = build_parser().parse_args(runtime_args("digits"))
    settings = settings_from_args(args)
    assert settings.bundles == [Path(MODEL_DIR)] and settings.model_name == "digits"
    assert (settings.host, settings.port, settings.grpc_port) == ("0.0.0.0", 8080, 8081)
    container = runtime_container()
    assert container["ports"] == [{"name": "http1", "containerPort": settings.port, "protocol": "TCP"}]
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["port"] for p in probes.values()} == {settings.port}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/live"
    for var in container["env"]:  # pydantic-settings would silently drop a misspelt OFFRAMP_ variable
        assert var["name"].removeprefix("OFFRAMP_").lower() in type(settings).model_fields, var["name"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/offramp/state", "/var/cache/offramp", "/tmp"} <= mounts  # read-only root filesystem


def test_inference_services_select_the_runtime_and_its_ports() -> None:
    runtime = doc("servingruntime.yaml")
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    settings = settings_from_args(build_parser().parse_args(runtime_args("x")))
    for name in ("inferenceservice.yaml", "inferenceservice-grpc.yaml"):
        isvc = doc(name)
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        # KServe's model names are DNS labels; the server takes them as model names.
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])
        notes = isvc["metadata"]["annotations"]
        assert notes["prometheus.io/port"] == str(settings.port) and notes["prometheus.io/path"] == "/metrics"
    grpc_model = doc("inferenceservice-grpc.yaml")["spec"]["predictor"]["model"]
    assert grpc_model["ports"] == [{"name": "h2c", "containerPort": settings.grpc_port, "protocol": "TCP"}]
    # Knative probes only the one port it routes: the gRPC service's probes are on the h2c port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert grpc_model[probe]["tcpSocket"] == {"port": settings.grpc_port}, probe
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(settings.port)


def test_model_name_renames_exactly_one_bundle(tmp_path: Path) -> None:
    bundle = build_onnx_bundle(tmp_path / "b")
    assert [b.name for b in load_bundles([bundle], "digits")] == ["digits"]
    assert [b.name for b in load_bundles([bundle])] == ["helper-dense"]
    with pytest.raises(BundleError, match="names one bundle, and 2 are configured"):
        load_bundles([bundle, bundle], "digits")
    with pytest.raises(BundleError, match="not a valid model name"):
        load_bundles([bundle], "no/slashes")


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The runtime's arguments as KServe runs them, but bound to loopback on free ports, the bundle
    where /mnt/models would be."""
    bundle = build_onnx_bundle(tmp_path_factory.mktemp("kserve") / "models")
    kept = [a for a in runtime_args("digits")[1:]
            if not a.startswith(("--bundle=", "--host=", "--port=", "--grpc-port="))]
    proc = ServerProcess(bundle, tmp_path_factory.mktemp("cache"), *kept, "--grpc-port", "0")
    assert proc.grpc_port is not None, proc.log
    yield proc
    proc.stop()


def test_the_pod_serves_the_bundle_under_the_inference_service_name(pod: ServerProcess) -> None:
    meta = httpx.get(f"{pod.url}/v2/models/digits").json()
    assert meta["name"] == "digits" and meta["platform"] == "offramp-early-exit"
    assert httpx.get(f"{pod.url}/v2/models/helper-dense").status_code == 404
    assert httpx.get(f"{pod.url}/v2/models/digits/ready").status_code == 200
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8], "data": [1.0] * 64}]}
    answer = httpx.post(f"{pod.url}/v2/models/digits/infer", json=body)
    assert answer.status_code == 200 and answer.json()["model_name"] == "digits"


def test_the_pod_answers_over_grpc_under_the_inference_service_name(pod: ServerProcess) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (test extra)")
    import numpy as np

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{pod.grpc_port}")
    try:
        assert client.is_model_ready("digits")
        inp = grpcclient.InferInput("pixels", [2, 8, 8], "FP32")
        inp.set_data_from_numpy(np.ones((2, 8, 8), np.float32))
        result = client.infer("digits", [inp])
        assert result.get_response().model_name == "digits"
        assert result.as_numpy("label").shape == (2,)
    finally:
        client.close()
