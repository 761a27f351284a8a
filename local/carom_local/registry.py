"""Pull an image from Docker Hub without a Docker engine: its registry API, on this host's network.

``local/compose-check`` runs its engine in a network namespace with no route out, so the engine
cannot pull; where the host reaches the registry, this writes the image as a ``docker save``
archive (manifest.json, the config, one compressed layer per folder: ``docker load`` inflates
them and checks them against the config's diff ids) for ``docker load``. Anonymous pulls only.
"""

from __future__ import annotations

import json
import platform
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

REGISTRY = "https://registry-1.docker.io"
AUTH = "https://auth.docker.io/token?service=registry.docker.io&scope=repository:{repo}:pull"
ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))  # fmt: skip
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _split(ref: str) -> tuple[str, str]:
    name, _, tag = ref.partition(":")
    return (name if "/" in name else f"library/{name}"), tag or "latest"


def _get(url: str, token: str, accept: str = "", timeout: float = 60.0) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if accept:
        headers["Accept"] = accept
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def save(ref: str, archive: Path) -> None:
    """Write ``ref`` (linux, this machine's architecture) as a docker-load archive."""
    repo, tag = _split(ref)
    with urllib.request.urlopen(AUTH.format(repo=repo), timeout=30) as r:
        token = json.load(r)["token"]
    with _get(f"{REGISTRY}/v2/{repo}/manifests/{tag}", token, ACCEPT) as r:
        manifest = json.load(r)
    if "manifests" in manifest:  # an index: this platform's manifest
        entry = next(
            m for m in manifest["manifests"]
            if m.get("platform", {}).get("os") == "linux"
            and m.get("platform", {}).get("architecture") == ARCH
        )  # fmt: skip
        with _get(f"{REGISTRY}/v2/{repo}/manifests/{entry['digest']}", token, ACCEPT) as r:
            manifest = json.load(r)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def blob(digest: str, dest: Path) -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            url = f"{REGISTRY}/v2/{repo}/blobs/{digest}"
            with _get(url, token, timeout=300) as r, dest.open("wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)

        config = manifest["config"]["digest"].split(":", 1)[1]
        blob(manifest["config"]["digest"], out / f"{config}.json")
        layers = []
        for layer in manifest["layers"]:
            hexd = layer["digest"].split(":", 1)[1]
            blob(layer["digest"], out / hexd / "layer.tar")
            layers.append(f"{hexd}/layer.tar")
        repo_tag = ref if ":" in ref else f"{ref}:latest"
        (out / "manifest.json").write_text(
            json.dumps([{"Config": f"{config}.json", "RepoTags": [repo_tag], "Layers": layers}])
        )
        with tarfile.open(archive, "w") as tar:
            for p in sorted(out.rglob("*")):
                tar.add(p, arcname=str(p.relative_to(out)), recursive=False)
