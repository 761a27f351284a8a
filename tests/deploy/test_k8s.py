"""k8s/ renders with kustomize, and every manifest passes the Kubernetes schemas, offline."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from carom_router.certs import load_certificate
from tests.deploy.deployfiles import (
    K8S,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    ROOT,
    SERVICES,
    kustomize,
)


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    docs = kustomize(request.param)
    assert docs, f"{request.param} renders nothing"
    return docs


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_the_schemas(rendered: list[dict[str, Any]], version: str) -> None:
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validator_catches_a_misspelt_field() -> None:
    """The check above can fail: strict validation refuses an unknown field."""
    deployment = next(d for d in kustomize("base") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_everything_lives_in_the_carom_namespace(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "carom", doc["metadata"]["name"]


def test_config_copies_are_the_service_yaml_files() -> None:
    """kustomize reads only files under k8s/base, so it holds copies: they must not drift."""
    for service in SERVICES.values():
        copy = K8S / "base" / "config" / service.yaml.name
        assert copy.read_text() == service.yaml.read_text(), (
            f"{copy.relative_to(ROOT)} differs from {service.yaml.relative_to(ROOT)}: "
            f"cp {service.yaml.relative_to(ROOT)} {copy.relative_to(ROOT)}"
        )


def test_tls_overlay_mounts_the_secret_the_script_makes(tmp_path: Path) -> None:
    """k8s/router-tls-secret.py makes the Secret the component mounts, with a pinnable cert."""
    out = subprocess.run(
        [sys.executable, str(K8S / "router-tls-secret.py"), "--host", "192.0.2.10"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    secret = yaml.safe_load(out)
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(secret, version, strict=True)
    assert secret["type"] == "kubernetes.io/tls"
    router = next(
        d
        for d in kustomize("overlays/minikube-tls")
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "router"
    )
    names = [
        v["secret"]["secretName"]
        for v in router["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    ]
    assert names == [secret["metadata"]["name"]]
    assert secret["metadata"]["namespace"] == router["metadata"]["namespace"]
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    bundle = load_certificate(tmp_path / "tls.crt", tmp_path / "tls.key")
    assert bundle.pinnable  # ECDSA, valid <= 14 days: what Chromium accepts by hash
    assert secret["metadata"]["annotations"]["carom/cert-sha256"] == bundle.sha256_hex


def test_tls_secret_script_refuses_what_chromium_refuses() -> None:
    proc = subprocess.run(
        [sys.executable, str(K8S / "router-tls-secret.py"), "--days", "15"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "14" in proc.stderr
    assert proc.stdout == ""


def test_both_services_read_the_token_from_the_secret_the_script_makes() -> None:
    """k8s/simulator-token-secret.py makes what the simulator and the router both refer to."""
    out = subprocess.run(
        [sys.executable, str(K8S / "simulator-token-secret.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    namespace, secret = [d for d in yaml.safe_load_all(out) if d]
    for doc in (namespace, secret):
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 32
    again = subprocess.run(
        [sys.executable, str(K8S / "simulator-token-secret.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert token not in again  # a fresh one every time, never a fixed value
    for path in KUSTOMIZATIONS:
        docs = kustomize(path)
        refs = {}
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            for c in d["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env", []):
                    if e["name"].endswith("TOKEN"):
                        ref = e["valueFrom"]["secretKeyRef"]
                        refs[e["name"]] = (d["metadata"]["namespace"], ref["name"], ref["key"])
        want = (secret["metadata"]["namespace"], secret["metadata"]["name"], "token")
        assert refs == {
            "CAROM_SIMULATOR__ACCESS__TOKEN": want,
            "CAROM_ROUTER__SIMULATOR__TOKEN": want,
        }, path
        assert not [d for d in docs if d["kind"] == "Secret"], "a token in git is no secret"


def test_ingress_tls_component_renders_and_allows_its_page(tmp_path: Path) -> None:
    """k8s/components/ingress-tls added to an overlay, as its comment says: valid manifests, no
    drift, and the router allows the page's origin through the Ingress."""
    import os

    from tests.deploy.deployfiles import k8s_containers, k8s_problems, settings_of

    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "minikube", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / "ingress-tls", tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    docs = kustomize(str(tmp_path))
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    assert k8s_problems(docs) == []
    [ingress] = [d for d in docs if d["kind"] == "Ingress"]
    assert ingress["spec"]["tls"][0]["secretName"] == "router-page-tls"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "router", "port": {"name": "http"}}
    [router] = [settings_of(c) for _, c, _ in k8s_containers(docs) if c.service.name == "router"]
    host = ingress["spec"]["rules"][0]["host"]
    assert f"https://{host}" in router.origins()
    assert (
        router.origins()
        >= settings_of(
            next(
                c
                for _, c, _ in k8s_containers(kustomize("overlays/minikube"))
                if c.service.name == "router"
            )
        ).origins()
    )
