#!/usr/bin/env python3
"""Checks that the parts of rendered manifests refer to each other, and to Tandem, correctly.

- Every HPA metric of type Pods is a name the prometheus-adapter rules (ADAPTER config.yaml)
  serve, derived from a gauge the workers really export (shared/engine/src/metrics.rs), and the
  rules key the series by namespace and pod.
- Every HPA scales a Deployment that is in the manifests, whose pods the PodMonitor scrapes;
  every KEDA ScaledObject scales one that is there and queries gauges the workers export.
- Every probe, Service targetPort and PodMonitor port names a port the selected pods declare.
- Every Tandem pod's grace period outlasts its preStop pause plus the drain deadline it is given
  (TANDEM_DRAIN_TIMEOUT_S, directly or through a ConfigMap), and has resource requests and
  limits.

    check_wiring.py --adapter-config k8s/prometheus-adapter/config.yaml RENDERED.yaml...

Needs PyYAML.
"""
import argparse
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER_METRICS = ROOT / "shared/engine/src/metrics.rs"


def exported_gauges():
    text = WORKER_METRICS.read_text()
    return set(re.findall(r'\bgauge\(\s*"([^"]+)"', text))


def served_metrics(config, gauges, failures):
    """The custom metric names the adapter rules make of the exported gauges."""
    served = {}
    for i, rule in enumerate(config.get("rules") or []):
        where = f"adapter rule {i}"
        for key in ("seriesQuery", "resources", "name", "metricsQuery"):
            if key not in rule:
                failures.append(f"{where}: no {key}")
        if any(f"{where}:" in f for f in failures):
            continue
        query = rule["seriesQuery"]
        m = re.search(r'__name__=~"([^"]+)"', query)
        series = re.compile(m.group(1)) if m else re.compile("^" + re.escape(query.split("{")[0]) + "$")
        overrides = (rule["resources"] or {}).get("overrides") or {}
        if (overrides.get("namespace") or {}).get("resource") != "namespace" or (overrides.get("pod") or {}).get("resource") != "pod":
            failures.append(f"{where}: resources must map the namespace and pod labels to their resources")
        for needed in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            if needed not in rule["metricsQuery"]:
                failures.append(f"{where}: metricsQuery lacks {needed}")
        matches = re.compile(rule["name"].get("matches", ""))
        as_ = re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda g: "\\g<" + (g.group(1) or g.group(2)) + ">", rule["name"].get("as", ""))
        hits = [g for g in sorted(gauges) if series.search(g)]
        if not hits:
            failures.append(f"{where}: its seriesQuery matches no gauge the workers export ({WORKER_METRICS.relative_to(ROOT)})")
        for g in hits:
            name = matches.sub(as_, g) if as_ else g
            if ":" in name:
                failures.append(f"{where}: serves {g} under {name!r}, a name with a colon")
            served[name] = g
    return served


def pod_templates(docs):
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]


def selects(selector, labels):
    ml = (selector or {}).get("matchLabels") or {}
    if any(labels.get(k) != v for k, v in ml.items()):
        return False
    for e in (selector or {}).get("matchExpressions") or []:
        v = labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and v not in e["values"]) or (op == "NotIn" and v in e["values"]):
            return False
        if (op == "Exists" and v is None) or (op == "DoesNotExist" and v is not None):
            return False
    return True


def port_names(template):
    return {p["name"] for c in template["spec"]["containers"] for p in c.get("ports") or [] if "name" in p}


def check(path, docs, served, gauges_exported, failures):
    where0 = path
    workloads = {(d["kind"], d["metadata"]["name"]): (d, t) for d, t in pod_templates(docs)}
    monitors = [d for d in docs if d.get("kind") == "PodMonitor"]
    config = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}

    for d, t in workloads.values():
        where = f"{where0}: {d['kind']}/{d['metadata']['name']}"
        names = port_names(t)
        spec = t["spec"]
        for c in spec["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe) or {}
                port = (p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                if isinstance(port, str) and port not in names:
                    failures.append(f"{where}: {probe} names port {port!r}, which no container declares")
            if not (c.get("resources") or {}).get("requests") or not (c.get("resources") or {}).get("limits"):
                failures.append(f"{where}: container {c['name']} lacks resource requests or limits")
            if not c.get("image", "").split("@")[0].rsplit("/", 1)[-1].startswith("tandem"):
                continue
            drain = None
            for e in c.get("env") or []:
                if e["name"] == "TANDEM_DRAIN_TIMEOUT_S" and "value" in e:
                    drain = int(e["value"])
            for ef in c.get("envFrom") or []:
                ref = (ef.get("configMapRef") or {}).get("name")
                if ref in config and "TANDEM_DRAIN_TIMEOUT_S" in config[ref] and drain is None:
                    drain = int(config[ref]["TANDEM_DRAIN_TIMEOUT_S"])
            args = c.get("args") or []
            for i, a in enumerate(args):
                if a.startswith("--drain-timeout-s"):
                    drain = int(a.split("=", 1)[1] if "=" in a else args[i + 1])
            drain = 120 if drain is None else drain  # Tandem's default
            pause = 0
            cmd = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
            if len(cmd) == 2 and cmd[0] == "sleep":
                pause = int(cmd[1])
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace <= pause + drain:
                failures.append(f"{where}: terminationGracePeriodSeconds {grace} does not outlast the preStop pause ({pause} s) plus the drain deadline ({drain} s)")

    for d in docs:
        if d.get("kind") != "Service" or not d["spec"].get("selector"):
            continue
        where = f"{where0}: Service/{d['metadata']['name']}"
        pods = [t for _, t in workloads.values() if selects({"matchLabels": d["spec"]["selector"]}, t["metadata"].get("labels") or {})]
        if not pods:
            failures.append(f"{where}: selects no pods")
        for p in d["spec"].get("ports") or []:
            tp = p.get("targetPort")
            if isinstance(tp, str) and not all(tp in port_names(t) for t in pods):
                failures.append(f"{where}: targetPort {tp!r} is not declared by every pod it selects")

    scraped = set()
    for m in monitors:
        where = f"{where0}: PodMonitor/{m['metadata']['name']}"
        pods = [(k, t) for k, (_, t) in workloads.items() if selects(m["spec"]["selector"], t["metadata"].get("labels") or {})]
        if not pods:
            failures.append(f"{where}: selects no pods")
        for ep in m["spec"]["podMetricsEndpoints"]:
            hit = [k for k, t in pods if ep.get("port") in port_names(t)]
            if not hit:
                failures.append(f"{where}: port {ep.get('port')!r} is declared by none of the pods it selects")
            scraped.update(hit)

    hpas = [d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"]
    for h in hpas:
        where = f"{where0}: HorizontalPodAutoscaler/{h['metadata']['name']}"
        ref = h["spec"]["scaleTargetRef"]
        key = (ref["kind"], ref["name"])
        if key not in workloads:
            failures.append(f"{where}: scales {ref['kind']}/{ref['name']}, which is not in the manifests")
        elif monitors and key not in scraped:
            failures.append(f"{where}: the PodMonitor does not scrape the pods of {ref['kind']}/{ref['name']}")
        elif "replicas" in workloads[key][0]["spec"]:
            failures.append(f"{where}: {ref['kind']}/{ref['name']} sets replicas, which every apply would reset under the HPA")
        for metric in h["spec"].get("metrics") or []:
            if metric["type"] == "Pods":
                name = metric["pods"]["metric"]["name"]
                if name not in served:
                    failures.append(f"{where}: metric {name!r} is not served by the prometheus-adapter rules (they serve {sorted(served)})")
    for so in (d for d in docs if d.get("kind") == "ScaledObject"):
        where = f"{where0}: ScaledObject/{so['metadata']['name']}"
        ref = so["spec"]["scaleTargetRef"]
        key = (ref.get("kind", "Deployment"), ref["name"])
        if key not in workloads:
            failures.append(f"{where}: scales {key[0]}/{key[1]}, which is not in the manifests")
        elif "replicas" in workloads[key][0]["spec"]:
            failures.append(f"{where}: {key[0]}/{key[1]} sets replicas, which every apply would reset under KEDA")
        for t in so["spec"]["triggers"]:
            if t["type"] != "prometheus":
                continue
            for name in re.findall(r"\b(vllm:[a-z_]+|tandem_[a-z_]+)\b", t["metadata"].get("query", "")):
                if name not in gauges_exported:
                    failures.append(f"{where}: its query reads {name}, which the workers do not export as a gauge")
    return len(hpas) + sum(1 for d in docs if d.get("kind") == "ScaledObject")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter-config", required=True)
    ap.add_argument("rendered", nargs="+")
    args = ap.parse_args()
    failures = []
    gauges = exported_gauges()
    config = yaml.safe_load(pathlib.Path(args.adapter_config).read_text())
    served = served_metrics(config, gauges, failures)
    hpas = 0
    for path in args.rendered:
        docs = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
        hpas += check(path, docs, served, gauges, failures)
    for f in failures:
        print(f"FAIL {f}")
    if failures:
        return 1
    pairs = ", ".join(f"{k} <- {v}" for k, v in sorted(served.items()))
    print(f"adapter serves {pairs}; {hpas} autoscalers (HPA, ScaledObject), probes, ports, PodMonitor and grace periods consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
