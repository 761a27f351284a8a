#!/usr/bin/env python3
"""Print the Secret `simulator-token` (and its Namespace) that the simulator and the router share.

The simulator answers its session API (offer, list, delete) only to a request carrying
``Authorization: Bearer <token>``; the router sends it. Both Deployments read the token from this
Secret (``secretKeyRef``), so they always agree. The token is random (32 bytes, URL-safe) and is
printed to stdout only, never written to a file:

    python3 k8s/simulator-token-secret.py | kubectl apply -f -

The Namespace comes along so that this works before the first ``kubectl apply -k``. To change
the token, run it again, then ``kubectl -n carom rollout restart deployment/simulator
deployment/router``. Only the standard library: any Python 3 runs it.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys


def manifests(token: str, name: str, namespace: str) -> list[dict[str, object]]:
    """The Namespace and the Secret holding ``token`` under the key ``token``."""
    labels = {"app.kubernetes.io/part-of": "carom"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": labels},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "data": {"token": base64.b64encode(token.encode("ascii")).decode("ascii")},
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="simulator-token")
    parser.add_argument("--namespace", default="carom")
    args = parser.parse_args(argv)
    # JSON is YAML: one document per manifest, which kubectl apply -f - reads in turn.
    for doc in manifests(secrets.token_urlsafe(32), args.name, args.namespace):
        sys.stdout.write("---\n" + json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
