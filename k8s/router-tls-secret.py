#!/usr/bin/env python3
"""Print the Secret `router-tls` (kubernetes.io/tls) for the router-tls component.

The certificate is made by the router's own code (``carom_router.certs.make_certificate``):
ECDSA P-256, valid 13 days, because Chromium accepts a certificate pinned with
``serverCertificateHashes`` only if it is ECDSA and valid at most 14 days. The key is printed
to stdout only, never written to a file:

    .venv/bin/python k8s/router-tls-secret.py --host "$(minikube ip)" | kubectl apply -f -

Without the component (the plain overlay) no Secret is needed: the router makes its own.
"""

from __future__ import annotations

import argparse
import base64
import sys

import yaml

from carom_router.certs import make_certificate


def secret(hosts: list[str], days: float, name: str, namespace: str) -> dict[str, object]:
    """The Secret manifest holding a fresh certificate for ``hosts``."""
    bundle = make_certificate(
        days=days, hosts=tuple(dict.fromkeys(("localhost", "127.0.0.1", *hosts)))
    )

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "carom"},
            # What the page will pin, and until when: for `kubectl describe` and rotation.
            "annotations": {
                "carom/cert-sha256": bundle.sha256_hex,
                "carom/cert-not-after": bundle.not_after.isoformat(),
            },
        },
        "data": {"tls.crt": b64(bundle.cert_pem), "tls.key": b64(bundle.key_pem)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", action="append", default=[], help="a name or IP for the certificate (repeat)"
    )
    parser.add_argument("--days", type=float, default=13.0, help="validity, at most 14")
    parser.add_argument("--name", default="router-tls")
    parser.add_argument("--namespace", default="carom")
    args = parser.parse_args(argv)
    try:
        manifest = secret(args.host, args.days, args.name, args.namespace)
    except ValueError as exc:
        print(f"router-tls-secret: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
