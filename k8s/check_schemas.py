#!/usr/bin/env python3
"""Sorts the documents of rendered manifests by who can check them.

Built-in kinds (everything whose API group Kubernetes itself serves) are written to --builtin-out,
for kubernetes-validate to check against the Kubernetes JSON schemas. Custom resources have no
schema there: each is checked here against the schema written for it in k8s/schemas/
(`<kind>.<group>.<version>.json`, lower case), and a custom resource without one fails.

    check_schemas.py --builtin-out OUT.yaml RENDERED.yaml...

Needs PyYAML and jsonschema (the validation virtual environment has both).
"""
import argparse
import json
import pathlib
import sys

import jsonschema
import yaml

SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"

# API groups Kubernetes serves itself ("" is the core group). Anything else is a custom resource.
BUILTIN_GROUPS = {
    "", "apps", "batch", "autoscaling", "policy", "networking.k8s.io", "rbac.authorization.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
    "admissionregistration.k8s.io", "apiextensions.k8s.io", "certificates.k8s.io", "node.k8s.io",
}


def group_version(api_version):
    group, _, version = api_version.rpartition("/")
    return group, version


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builtin-out", required=True)
    ap.add_argument("rendered", nargs="+")
    args = ap.parse_args()

    builtin, failures, custom = [], [], 0
    for path in args.rendered:
        for doc in yaml.safe_load_all(pathlib.Path(path).read_text()):
            if not doc:
                continue
            api_version, kind = doc.get("apiVersion"), doc.get("kind")
            name = (doc.get("metadata") or {}).get("name")
            where = f"{path}: {kind}/{name}"
            if not api_version or not kind or not name:
                failures.append(f"{where}: apiVersion, kind and metadata.name are required")
                continue
            group, version = group_version(api_version)
            if group in BUILTIN_GROUPS:
                builtin.append(doc)
                continue
            schema_file = SCHEMAS / f"{kind.lower()}.{group}.{version}.json"
            if not schema_file.is_file():
                failures.append(f"{where}: custom resource {api_version} {kind} has no schema ({schema_file.name} in k8s/schemas/)")
                continue
            schema = json.loads(schema_file.read_text())
            validator = jsonschema.Draft202012Validator(schema)
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            for e in errors:
                at = ".".join(str(p) for p in e.absolute_path) or "(document)"
                failures.append(f"{where}: {at}: {e.message} (schema {schema_file.name})")
            custom += 1

    pathlib.Path(args.builtin_out).write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    for f in failures:
        print(f"FAIL {f}")
    if failures:
        return 1
    names = ", ".join(pathlib.Path(p).stem for p in args.rendered)
    print(f"{names}: {len(builtin)} built-in documents for kubernetes-validate, {custom} custom resources valid against k8s/schemas/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
