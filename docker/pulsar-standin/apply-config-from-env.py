#!/usr/bin/env python3
"""Stand-in for Apache Pulsar's bin/apply-config-from-env.py, as the official image runs it.

For each config file named: a key already in the file takes the value of an env variable of the
same name; ``PULSAR_PREFIX_<key>`` sets ``<key>``, appending it when the file lacks it.
"""

import os
import sys

PREFIX = "PULSAR_PREFIX_"

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    wanted = {k[len(PREFIX) :]: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    out = []
    for line in lines:
        key = line.split("=", 1)[0].strip() if "=" in line and not line.startswith("#") else ""
        if key and key in wanted:
            line = f"{key}={wanted.pop(key)}"
        elif key and key in os.environ:
            line = f"{key}={os.environ[key]}"
        out.append(line)
    out += [f"{k}={v}" for k, v in wanted.items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    print(f"apply-config-from-env.py: {path} updated")
