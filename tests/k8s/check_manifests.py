#!/usr/bin/env python3
"""Offline checks of the deployment files.

1. Every document in k8s/*.yaml validates (strict: unknown fields are errors) against the
   Kubernetes JSON schemas that the kubernetes-validate package ships, for KUBERNETES_VERSION.
2. The env contract of the `ticketing` roles on Kubernetes: NATS, MongoDB, Redis, secrets,
   probes, resources and security context of the api, worker and scheduler Deployments, the
   wiring between manifests (services, ports, selectors, ingress, Mongo members), NATS as a
   three-node JetStream cluster with the worker's stream replicas to match, and the worker's
   stream limits against NATS's max_file_store and volume.
3. docker-compose.yml, skaffold.yaml and the Dockerfile say what the README promises.

Usage: python3 tests/k8s/check_manifests.py   (needs: pip install kubernetes-validate pyyaml)
Exit status 0 when everything holds; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.30.0"
ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
UID = 10001

# The three roles of the binary on Kubernetes: file, Deployment, role argument, health port.
ROLES = {
    "api": ("tickets-depl.yaml", "tickets-depl", "api", 3000),
    "worker": ("tickets-worker-depl.yaml", "tickets-worker-depl", "worker", 9090),
    "scheduler": ("tickets-scheduler-depl.yaml", "tickets-scheduler-depl", "scheduler", 9090),
}
EXPECTED_FILES = {
    "tickets-depl.yaml",
    "tickets-worker-depl.yaml",
    "tickets-scheduler-depl.yaml",
    "tickets-mongo-depl.yaml",
    "tickets-redis-depl.yaml",
    "nats-depl.yaml",
    "ingress-srv.yaml",
}

failures: list[str] = []
passed = 0


def check(cond: Any, message: str) -> bool:
    global passed
    if cond:
        passed += 1
        return True
    failures.append(message)
    return False


def load_all(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ---------------------------------------------------------------------------------------------
# 1. Schemas


def validate_schemas() -> dict[str, list[dict]]:
    docs: dict[str, list[dict]] = {}
    files = sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    check(files, f"no manifests in {K8S}")
    missing = EXPECTED_FILES - {f.name for f in files}
    check(not missing, f"k8s/: missing {sorted(missing)}")
    for path in files:
        try:
            file_docs = load_all(path)
        except yaml.YAMLError as e:
            failures.append(f"{path.name}: not YAML: {e}")
            continue
        docs[path.name] = file_docs
        check(file_docs, f"{path.name}: no documents")
        for doc in file_docs:
            what = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                check(True, "")
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                failures.append(f"{what}: invalid for Kubernetes {KUBERNETES_VERSION} at {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                failures.append(f"{what}: {e.message}")
            except Exception as e:  # noqa: BLE001 - report anything else as a failure too
                failures.append(f"{what}: could not be validated: {e}")
    return docs


# ---------------------------------------------------------------------------------------------
# 2. The env contract and the wiring


def find(docs: dict[str, list[dict]], kind: str, name: str) -> dict | None:
    for file_docs in docs.values():
        for d in file_docs:
            if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
                return d
    return None


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def port_number(container: dict, port: Any) -> Any:
    """A probe's or Service's port (number or container port name) as a number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def check_plain(env: dict, name: str, where: str, pred: Callable[[str], bool] = bool, what: str = "") -> None:
    e = env.get(name)
    if not check(e is not None, f"{where}: env {name} is missing"):
        return
    value = e.get("value")
    check(isinstance(value, str) and pred(value), f"{where}: env {name}={value!r} {what or 'is empty'}")


def check_role(docs: dict, role: str) -> None:
    file, name, arg, health_port = ROLES[role]
    where = f"{file}: {name}"
    depl = find(docs, "Deployment", name)
    if not check(depl is not None, f"{file}: no Deployment {name}"):
        return
    check(name in {d["metadata"]["name"] for d in docs.get(file, [])}, f"{name} is not in {file}")
    spec = depl["spec"]
    pod = spec["template"]["spec"]
    containers = pod["containers"]
    check(len(containers) == 1, f"{where}: expected one container")
    c = containers[0]
    check(c.get("image") == "tickets", f"{where}: image must be `tickets` (skaffold substitutes it)")
    check(c.get("args") == [arg] or c.get("command") == ["ticketing", arg], f"{where}: must run `ticketing {arg}`")
    env = env_of(c)

    # NATS, as in the course's tickets-depl.yaml.
    check_plain(env, "NATS_URL", where, lambda v: re.fullmatch(r"(nats|http)://nats-srv:4222", v) is not None,
                "must be nats://nats-srv:4222 (or the course's http://)")
    check_plain(env, "NATS_CLUSTER_ID", where, lambda v: v == "ticketing", "must be `ticketing`")
    cid = env.get("NATS_CLIENT_ID", {})
    check(cid.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          f"{where}: NATS_CLIENT_ID must come from fieldRef metadata.name (unique per pod)")

    if role in ("api", "worker"):
        check_plain(env, "MONGO_URI", where, lambda v: v.startswith("mongodb://") and "replicaSet=rs0" in v,
                    "must be a mongodb:// URI of the replica set rs0")
        check("SQLITE_PATH" not in env, f"{where}: SQLITE_PATH is for one machine, not Kubernetes")
    if role in ("worker", "scheduler"):
        check_plain(env, "REDIS_URL", where, lambda v: v.startswith("redis://"), "must be a redis:// URL")
        check_plain(env, "HEALTH_PORT", where, lambda v: v == str(health_port), f"must be {health_port}")
    if role == "api":
        ref = env.get("JWT_KEY", {}).get("valueFrom", {}).get("secretKeyRef", {})
        check(ref.get("name") == "jwt-secret" and ref.get("key") == "JWT_KEY" and not ref.get("optional"),
              f"{where}: JWT_KEY must come from secret jwt-secret, key JWT_KEY (required)")
        port = env.get("PORT", {}).get("value", "3000")
        check(port == "3000", f"{where}: PORT must be 3000")
    else:
        check("JWT_KEY" not in env, f"{where}: the {role} has no use for JWT_KEY")
    if role == "worker":
        ref = env.get("ALERT_WEBHOOK_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        check(ref.get("name") and ref.get("key") == "ALERT_WEBHOOK_URL" and ref.get("optional") is True,
              f"{where}: ALERT_WEBHOOK_URL must come from an optional secretKeyRef (key ALERT_WEBHOOK_URL)")
        check_plain(env, "ALERT_THRESHOLD", where, lambda v: v.isdigit() and int(v) >= 1, "must be a count >= 1")
    if role == "scheduler":
        sched = env.get("RETRY_SCHEDULE", {}).get("value")
        if sched is not None:
            check(len(sched.split()) == 6, f"{where}: RETRY_SCHEDULE needs 6 fields (with seconds): {sched!r}")
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref.get("name") not in ("jwt-secret",):
            check(ref.get("optional") is True, f"{where}: secret {ref.get('name')} must be optional")
    log = env.get("LOG_FORMAT", {}).get("value")
    check(log == "json", f"{where}: LOG_FORMAT must be json")

    # Replicas and rollout.
    if role == "scheduler":
        check(spec.get("replicas") == 1, f"{where}: run ONE scheduler replica")
        check(spec.get("strategy", {}).get("type") == "Recreate", f"{where}: strategy must be Recreate")
    else:
        check(spec.get("replicas", 1) >= 2, f"{where}: run at least 2 replicas")

    # Probes on the role's port.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, f"{where}: {probe} must GET {path}")
        check(port_number(c, get.get("port")) == health_port,
              f"{where}: {probe} must use port {health_port}, not {get.get('port')!r}")
    if "startupProbe" in c:
        get = c["startupProbe"].get("httpGet", {})
        check(get.get("path") == "/healthz" and port_number(c, get.get("port")) == health_port,
              f"{where}: startupProbe must GET /healthz on {health_port}")
    check(any(p.get("containerPort") == health_port for p in c.get("ports", [])),
          f"{where}: containerPort {health_port} must be declared")

    # Resources.
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            check(res.get(kind, {}).get(r), f"{where}: resources.{kind}.{r} is missing")

    # Security context: the container's settings, falling back to the pod's.
    pod_sc = pod.get("securityContext", {})
    sc = {**{k: v for k, v in pod_sc.items() if k in ("runAsNonRoot", "runAsUser")}, **c.get("securityContext", {})}
    check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot must be true")
    check(sc.get("runAsUser") == UID, f"{where}: runAsUser must be {UID}")
    check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem must be true")
    check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities must drop ALL")


QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: Any) -> float | None:
    m = QUANTITY.match(str(value))
    return float(m.group(1)) * FACTORS[m.group(3)] if m else None


def check_resources(docs: dict) -> None:
    """Every container of every pod template: well-formed quantities, requests within limits."""
    for file, fd in docs.items():
        for d in fd:
            tmpl = d.get("spec", {}).get("template", {}).get("spec")
            if not tmpl:
                continue
            for c in tmpl.get("containers", []) + tmpl.get("initContainers", []):
                where = f"{file}: {d['kind']}/{d['metadata']['name']}/{c['name']}"
                res = c.get("resources", {})
                check(res.get("requests") and res.get("limits", {}).get("memory"),
                      f"{where}: needs resource requests and a memory limit")
                for kind in ("requests", "limits"):
                    for r, v in res.get(kind, {}).items():
                        check(quantity(v) is not None, f"{where}: resources.{kind}.{r}={v!r} is not a quantity")
                for r, v in res.get("requests", {}).items():
                    lim = res.get("limits", {}).get(r)
                    if lim is not None and quantity(v) is not None and quantity(lim) is not None:
                        check(quantity(v) <= quantity(lim), f"{where}: {r} request {v} exceeds its limit {lim}")


def services_for(docs: dict) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for fd in docs.values() for d in fd if d.get("kind") == "Service"}


def workloads(docs: dict) -> list[dict]:
    kinds = ("Deployment", "StatefulSet")
    return [d for fd in docs.values() for d in fd if d.get("kind") in kinds]


def check_wiring(docs: dict) -> None:
    services = services_for(docs)
    loads = workloads(docs)

    # Every Service selects the pods of a workload, on ports those pods declare.
    for name, svc in services.items():
        selector = svc["spec"].get("selector", {})
        matched = [w for w in loads
                   if selector and selector.items() <= w["spec"]["template"]["metadata"].get("labels", {}).items()]
        if not check(matched, f"Service {name}: selector {selector} matches no workload"):
            continue
        c_ports = [p for w in matched for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            ok = any(cp.get("name") == target or cp.get("containerPort") == target for cp in c_ports)
            check(ok, f"Service {name}: targetPort {target!r} is not a port of its pods")
    # Every workload's selector matches its own template.
    for w in loads:
        sel = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        check(sel.items() <= labels.items(), f"{w['kind']} {w['metadata']['name']}: selector does not match its pods")

    # The course's names.
    srv = services.get("tickets-srv")
    if check(srv is not None, "Service tickets-srv is missing"):
        check(any(p["port"] == 3000 for p in srv["spec"]["ports"]), "Service tickets-srv must listen on port 3000")
        check(srv["spec"].get("selector") == {"app": "tickets"} or
              srv["spec"].get("selector", {}).items() <=
              find(docs, "Deployment", "tickets-depl")["spec"]["template"]["metadata"]["labels"].items(),
              "Service tickets-srv must select the tickets-depl pods")
    nats = services.get("nats-srv")
    if check(nats is not None, "Service nats-srv is missing"):
        ports = {p["port"] for p in nats["spec"]["ports"]}
        check({4222, 8222} <= ports, f"Service nats-srv must expose 4222 and 8222, has {sorted(ports)}")

    # NATS runs JetStream with persistent storage.
    nats_w = [w for w in loads if w["spec"]["template"]["metadata"].get("labels", {}).get("app") == "nats"]
    if check(len(nats_w) == 1, "exactly one NATS workload (label app: nats) expected"):
        w = nats_w[0]
        c = w["spec"]["template"]["spec"]["containers"][0]
        args = " ".join(c.get("command", []) + c.get("args", []))
        confs = [d for fd in docs.values() for d in fd if d.get("kind") == "ConfigMap"
                 and any(v.get("configMap", {}).get("name") == d["metadata"]["name"]
                         for v in w["spec"]["template"]["spec"].get("volumes", []))]
        conf_text = " ".join(v for d in confs for v in d.get("data", {}).values())
        check(re.search(r"(^|\s)(-js|--js|--jetstream)(\s|$)", args) or re.search(r"(?m)^\s*jetstream\s*[{:]", conf_text),
              "NATS must run with JetStream enabled")
        store = re.search(r"store_dir:\s*(\S+)", conf_text) or re.search(r"(?:-sd|--store_dir)[= ](\S+)", args)
        persistent = w["kind"] == "StatefulSet" and w["spec"].get("volumeClaimTemplates")
        if not persistent:
            persistent = any("persistentVolumeClaim" in v for v in w["spec"]["template"]["spec"].get("volumes", []))
        check(persistent, "NATS JetStream storage must be a PersistentVolumeClaim")
        if check(store, "NATS must set a JetStream store directory"):
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            check(any(store.group(1).rstrip("/").startswith(m.rstrip("/")) for m in mounts),
                  f"NATS store_dir {store.group(1)} must be on a mounted volume ({mounts})")

    # MongoDB: a StatefulSet tickets-mongo as replica set rs0 behind the headless tickets-mongo-srv.
    mongo = find(docs, "StatefulSet", "tickets-mongo")
    msrv = services.get("tickets-mongo-srv")
    if check(mongo is not None, "StatefulSet tickets-mongo is missing") and \
            check(msrv is not None, "Service tickets-mongo-srv is missing"):
        check(msrv["spec"].get("clusterIP") == "None", "Service tickets-mongo-srv must be headless")
        check(mongo["spec"].get("serviceName") == "tickets-mongo-srv", "tickets-mongo: serviceName must be tickets-mongo-srv")
        check(mongo["spec"].get("volumeClaimTemplates"), "tickets-mongo needs a volumeClaimTemplate")
        c = mongo["spec"]["template"]["spec"]["containers"][0]
        args = c.get("command", []) + c.get("args", [])
        check("--replSet" in args and args[args.index("--replSet") + 1] == "rs0", "tickets-mongo must run --replSet rs0")
        replicas = mongo["spec"].get("replicas", 1)
        members = {f"tickets-mongo-{i}.tickets-mongo-srv:27017" for i in range(replicas)}
        init = find(docs, "Job", "tickets-mongo-init")
        if check(init is not None, "Job tickets-mongo-init (replica set initiation) is missing"):
            ic = init["spec"]["template"]["spec"]["containers"][0]
            script = " ".join(ic.get("command", []) + ic.get("args", []))
            check("rs.initiate" in script, "tickets-mongo-init must run rs.initiate")
            n = env_of(ic).get("REPLICAS", {}).get("value")
            check(n == str(replicas), f"tickets-mongo-init REPLICAS={n!r} must equal the StatefulSet's {replicas}")
        for role in ("api", "worker"):
            depl = find(docs, "Deployment", ROLES[role][1])
            if depl is None:
                continue
            uri = env_of(depl["spec"]["template"]["spec"]["containers"][0]).get("MONGO_URI", {}).get("value", "")
            m = re.match(r"mongodb://([^/]+)/", uri)
            hosts = set(m.group(1).split(",")) if m else set()
            check(hosts and hosts <= members,
                  f"{role}: MONGO_URI hosts {sorted(hosts)} must be members of tickets-mongo ({sorted(members)})")
            check(hosts == members, f"{role}: MONGO_URI should list every member ({sorted(members)}), has {sorted(hosts)}")

    # Host:port of NATS_URL and REDIS_URL are Services of these manifests.
    for role in ROLES:
        depl = find(docs, "Deployment", ROLES[role][1])
        if depl is None:
            continue
        env = env_of(depl["spec"]["template"]["spec"]["containers"][0])
        for var in ("NATS_URL", "REDIS_URL"):
            value = env.get(var, {}).get("value")
            if not value:
                continue
            m = re.match(r"\w+://([^:/]+):(\d+)", value)
            if check(m, f"{role}: {var}={value!r} needs host:port"):
                svc = services.get(m.group(1))
                check(svc is not None and any(p["port"] == int(m.group(2)) for p in svc["spec"]["ports"]),
                      f"{role}: {var} points at {m.group(1)}:{m.group(2)}, not a Service port of k8s/")

    # The ingress: ticketing.dev, /api/tickets -> tickets-srv:3000, nginx regex paths.
    ingresses = [d for fd in docs.values() for d in fd if d.get("kind") == "Ingress"]
    if check(len(ingresses) == 1, "exactly one Ingress expected (ingress-srv.yaml)"):
        ing = ingresses[0]
        check(ing["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/use-regex") == "true",
              "Ingress: nginx.ingress.kubernetes.io/use-regex must be \"true\"")
        check(ing["spec"].get("ingressClassName") == "nginx"
              or ing["metadata"].get("annotations", {}).get("kubernetes.io/ingress.class") == "nginx",
              "Ingress: ingress class must be nginx")
        routes = [(r.get("host"), p) for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
        tickets = [(h, p) for h, p in routes if re.match(p["path"], "/api/tickets/123") and
                   re.match(p["path"], "/api/tickets")]
        if check(tickets, "Ingress: no path routes /api/tickets"):
            host, path = tickets[0]
            check(host == "ticketing.dev", f"Ingress: host must be ticketing.dev, is {host!r}")
            backend = path["backend"]["service"]
            check(backend["name"] == "tickets-srv" and backend["port"].get("number") == 3000,
                  f"Ingress: /api/tickets must go to tickets-srv:3000, goes to {backend}")
            check(path.get("pathType") == "ImplementationSpecific", "Ingress: regex paths need pathType ImplementationSpecific")
            check(not re.match(path["path"] + "$", "/api/orders"), "Ingress: the tickets path must not catch /api/orders")


# NATS sizes: `1536MB` is MiB, `1536M` is millions of bytes (nats-server's config parser).
NATS_SIZE = re.compile(r"^([0-9]+)\s*([kmgt]?)(b|i|ib)?$", re.IGNORECASE)
# The streams of NATS_STREAM_MAX_BYTES each server holds: the tickets stream, and the orders
# stream this service creates once order events land.
STREAMS_SIZED_FOR = 2
DUPLICATE_WINDOW_DEFAULT = 120


def nats_size(value: str) -> int | None:
    m = NATS_SIZE.match(value.strip())
    if not m:
        return None
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(m.group(1)) * (1024 if m.group(3) else 1000) ** power


def check_nats_cluster(docs: dict) -> None:
    """NATS is a JetStream cluster of an odd number (3+) of servers: a StatefulSet whose pods
    route to each other through a headless Service, named after their pods, a volume each; the
    worker's streams have as many replicas as there are servers (at most 3, JetStream's
    usual)."""
    nats_w = [w for w in workloads(docs) if w["spec"]["template"]["metadata"].get("labels", {}).get("app") == "nats"]
    if len(nats_w) != 1:
        return
    w = nats_w[0]
    name = w["metadata"]["name"]
    replicas = w["spec"].get("replicas", 1)
    if not check(w["kind"] == "StatefulSet", "NATS must be a StatefulSet (a stable name and volume per server)"):
        return
    check(replicas >= 3 and replicas % 2 == 1, f"NATS: a cluster of 3 (or 5) servers, not {replicas}")
    check(w["spec"].get("podManagementPolicy") == "Parallel",
          "NATS: podManagementPolicy Parallel (a server is ready only once the cluster has formed)")
    check(w["spec"].get("volumeClaimTemplates"), "NATS: a volume per server (volumeClaimTemplates)")
    headless = services_for(docs).get(w["spec"].get("serviceName", ""))
    if check(headless is not None, f"NATS: serviceName {w['spec'].get('serviceName')!r} is not a Service of k8s/"):
        hs = headless["spec"]
        check(hs.get("clusterIP") == "None", f"Service {headless['metadata']['name']} must be headless (clusterIP: None)")
        check(hs.get("publishNotReadyAddresses") is True,
              f"Service {headless['metadata']['name']}: publishNotReadyAddresses (routes resolve before readiness)")
        check(any(p["port"] == 6222 for p in hs.get("ports", [])),
              f"Service {headless['metadata']['name']} must expose the cluster port 6222")
    c = w["spec"]["template"]["spec"]["containers"][0]
    check(any(p.get("containerPort") == 6222 for p in c.get("ports", [])), "NATS: containerPort 6222 (routes)")
    pod_name = env_of(c).get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    confs = [d for fd in docs.values() for d in fd if d.get("kind") == "ConfigMap"
             and any(v.get("configMap", {}).get("name") == d["metadata"]["name"]
                     for v in w["spec"]["template"]["spec"].get("volumes", []))]
    conf = " ".join(v for d in confs for v in d.get("data", {}).values())
    check(re.search(r"(?m)^\s*server_name:\s*\$POD_NAME\s*$", conf) and pod_name == "metadata.name",
          "NATS: server_name must be $POD_NAME, from fieldRef metadata.name")
    check(re.search(r"(?m)^\s*cluster\s*[{:]", conf), "NATS: a cluster block")
    if headless is not None:
        hname = headless["metadata"]["name"]
        routes = set(re.findall(r"nats://([\w.-]+):6222", conf))
        wanted = {f"{name}-{i}.{hname}" for i in range(replicas)}
        check(wanted <= routes, f"NATS routes must list every server ({sorted(wanted)}), have {sorted(routes)}")
    pdbs = [d for fd in docs.values() for d in fd if d.get("kind") == "PodDisruptionBudget"
            and d["spec"].get("selector", {}).get("matchLabels", {}).items()
            <= w["spec"]["template"]["metadata"].get("labels", {}).items()]
    check(len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == 1,
          "NATS: a PodDisruptionBudget with maxUnavailable 1 (a majority stays up)")

    depl = find(docs, "Deployment", ROLES["worker"][1])
    if depl is not None:
        where = f"{ROLES['worker'][0]}: {ROLES['worker'][1]}"
        env = env_of(depl["spec"]["template"]["spec"]["containers"][0])
        check_plain(env, "NATS_STREAM_REPLICAS", where, lambda v: v == str(min(replicas, 3)),
                    f"must be {min(replicas, 3)}: a copy on each of the cluster's servers")


def check_stream_sizing(docs: dict) -> None:
    """The worker's stream limits keep the outbox's guarantees and fit NATS's storage, which
    fits its volume."""
    depl = find(docs, "Deployment", ROLES["worker"][1])
    nats_w = [w for w in workloads(docs) if w["spec"]["template"]["metadata"].get("labels", {}).get("app") == "nats"]
    if depl is None or len(nats_w) != 1:
        return
    where = f"{ROLES['worker'][0]}: {ROLES['worker'][1]}"
    env = env_of(depl["spec"]["template"]["spec"]["containers"][0])
    check_plain(env, "NATS_STREAM_MAX_AGE_SECS", where, str.isdigit, "must be a number of seconds")
    check_plain(env, "NATS_STREAM_MAX_BYTES", where, str.isdigit, "must be a number of bytes")
    age = env.get("NATS_STREAM_MAX_AGE_SECS", {}).get("value", "")
    window = env.get("NATS_DUPLICATE_WINDOW_SECS", {}).get("value", str(DUPLICATE_WINDOW_DEFAULT))
    if age.isdigit() and window.isdigit():
        check(int(age) > int(window),
              f"{where}: NATS_STREAM_MAX_AGE_SECS ({age}) must exceed NATS_DUPLICATE_WINDOW_SECS ({window})")
    max_bytes = env.get("NATS_STREAM_MAX_BYTES", {}).get("value", "")

    w = nats_w[0]
    confs = [d for fd in docs.values() for d in fd if d.get("kind") == "ConfigMap"
             and any(v.get("configMap", {}).get("name") == d["metadata"]["name"]
                     for v in w["spec"]["template"]["spec"].get("volumes", []))]
    conf_text = " ".join(v for d in confs for v in d.get("data", {}).values())
    store = re.search(r"(?m)^\s*max_file_store:\s*([0-9]+\s*[A-Za-z]*)\s*$", conf_text)
    if not check(store, "NATS must set jetstream max_file_store (what the streams may fill)"):
        return
    file_store = nats_size(store.group(1))
    if not check(file_store, f"NATS max_file_store {store.group(1)!r} is not a size"):
        return
    if max_bytes.isdigit():
        check(int(max_bytes) * STREAMS_SIZED_FOR <= file_store,
              f"{where}: {STREAMS_SIZED_FOR} streams of NATS_STREAM_MAX_BYTES ({max_bytes}) must fit NATS's "
              f"max_file_store ({store.group(1)} = {file_store} bytes)")
    claims = w["spec"].get("volumeClaimTemplates", [])
    sizes = [quantity(c["spec"]["resources"]["requests"]["storage"]) for c in claims
             if c.get("spec", {}).get("resources", {}).get("requests", {}).get("storage")]
    if check(sizes and sizes[0], "NATS's volume claim needs a storage size"):
        check(file_store < sizes[0],
              f"NATS max_file_store ({file_store} bytes) must be smaller than its volume ({sizes[0]:.0f} bytes)")


# ---------------------------------------------------------------------------------------------
# 3. Compose, skaffold, Dockerfile


def check_compose() -> None:
    path = ROOT / "docker-compose.yml"
    if not check(path.exists(), "docker-compose.yml is missing"):
        return
    try:
        compose = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        failures.append(f"docker-compose.yml: not YAML: {e}")
        return
    services = compose.get("services", {})
    expected = {"mongo", "redis", "nats", "api", "worker", "scheduler"}
    check(expected <= set(services), f"docker-compose.yml: services {sorted(expected - set(services))} are missing")
    if not expected <= set(services):
        return
    mongo_cmd = " ".join(map(str, services["mongo"].get("command", [])))
    check("--replSet" in mongo_cmd, "compose mongo: must run as a replica set (--replSet)")
    hc = " ".join(map(str, services["mongo"].get("healthcheck", {}).get("test", [])))
    check("rs.initiate" in hc, "compose mongo: the healthcheck must initiate the replica set")
    nats_cmd = " ".join(map(str, services["nats"].get("command", [])))
    check(re.search(r"(^|\s)(-js|--js|--jetstream)(\s|$)", nats_cmd), "compose nats: JetStream (-js) must be on")
    check(services["nats"].get("volumes"), "compose nats: JetStream storage needs a volume")
    for role in ("api", "worker", "scheduler"):
        s = services[role]
        check(s.get("command") == [role], f"compose {role}: command must be [\"{role}\"]")
        check(s.get("build") or s.get("image"), f"compose {role}: needs build or image")
        env = s.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
        if role in ("api", "worker"):
            check(str(env.get("MONGO_URI", "")).startswith("mongodb://mongo:27017/"),
                  f"compose {role}: MONGO_URI must point at the mongo service")
            check("replicaSet=rs0" in str(env.get("MONGO_URI", "")), f"compose {role}: MONGO_URI needs replicaSet=rs0")
            check("mongo" in s.get("depends_on", {}), f"compose {role}: must depend on mongo")
        if role in ("worker", "scheduler"):
            check(str(env.get("REDIS_URL", "")).startswith("redis://redis:"), f"compose {role}: REDIS_URL must be redis://redis:6379")
        if role == "worker":
            check(str(env.get("NATS_URL", "")).startswith(("nats://nats:", "http://nats:")), "compose worker: NATS_URL must be the nats service")
        if role == "api":
            check(env.get("JWT_KEY"), "compose api: JWT_KEY must be set")
            check(any(str(p).split(":")[-1] == "3000" and str(p).count(":") >= 1 for p in s.get("ports", [])),
                  "compose api: port 3000 must be published")


def check_skaffold() -> None:
    path = ROOT / "skaffold.yaml"
    if not check(path.exists(), "skaffold.yaml is missing"):
        return
    sk = yaml.safe_load(path.read_text())
    check(str(sk.get("apiVersion", "")).startswith("skaffold/v4beta"), "skaffold.yaml: apiVersion must be skaffold/v4beta*")
    check(sk.get("kind") == "Config", "skaffold.yaml: kind must be Config")
    build = sk.get("build", {})
    check(build.get("local", {}).get("push") is False, "skaffold.yaml: build.local.push must be false")
    arts = build.get("artifacts", [])
    check([a.get("image") for a in arts] == ["tickets"], "skaffold.yaml: build exactly the image `tickets`")
    if arts:
        check(arts[0].get("docker", {}).get("dockerfile", "Dockerfile") == "Dockerfile",
              "skaffold.yaml: the image must be built from the Dockerfile")
    raw = sk.get("manifests", {}).get("rawYaml", [])
    check(any(r.strip("./").startswith("k8s/") for r in raw), "skaffold.yaml: manifests.rawYaml must list k8s/*")


def check_dockerfile() -> None:
    path = ROOT / "Dockerfile"
    if not check(path.exists(), "Dockerfile is missing"):
        return
    text = path.read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages = [ln for ln in lines if ln.upper().startswith("FROM ")]
    check(len(stages) >= 3, "Dockerfile: expected a multi-stage build")
    final = lines[max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")):]
    def last(instr: str) -> str | None:
        found = [ln for ln in final if ln.upper().startswith(instr + " ")]
        return found[-1][len(instr) + 1:].strip() if found else None
    check(last("ENTRYPOINT") == '["ticketing"]', "Dockerfile: ENTRYPOINT must be [\"ticketing\"]")
    check(last("CMD") == '["all"]', "Dockerfile: CMD must be [\"all\"]")
    user = last("USER") or ""
    check(user.split(":")[0] == str(UID), f"Dockerfile: the runtime stage must run as USER {UID} (numeric)")
    exposed = {p for ln in final if ln.upper().startswith("EXPOSE ") for p in ln.split()[1:]}
    check({"3000", "9090"} <= exposed, "Dockerfile: EXPOSE 3000 9090")
    check("cargo chef cook" in text, "Dockerfile: dependencies must be cached (cargo chef cook)")
    check("--locked" in text, "Dockerfile: build with --locked")
    ignore = ROOT / ".dockerignore"
    if check(ignore.exists(), ".dockerignore is missing"):
        entries = {ln.strip().strip("/") for ln in ignore.read_text().splitlines()}
        check({"target", ".git"} <= entries, ".dockerignore must exclude target/ and .git")


def main() -> int:
    docs = validate_schemas()
    for role in ROLES:
        check_role(docs, role)
    check_wiring(docs)
    check_nats_cluster(docs)
    check_stream_sizing(docs)
    check_resources(docs)
    check_compose()
    check_skaffold()
    check_dockerfile()
    n_docs = sum(len(d) for d in docs.values())
    if failures:
        for f in failures:
            print(f"FAIL {f}")
        print(f"{len(failures)} problem(s); {passed} checks passed")
        return 1
    print(f"ok: {n_docs} Kubernetes documents in {len(docs)} files valid for Kubernetes {KUBERNETES_VERSION} "
          f"(strict); env contract, wiring, compose, skaffold and Dockerfile: {passed} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
