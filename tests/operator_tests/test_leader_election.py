"""Two operator processes under leader election on the real control plane: exactly one acts, the other
takes over when the first is killed or stopped, and manifests/install-ha applies in one go.

The processes authenticate as the shipped ServiceAccount with the roles of manifests/install-ha (the
Lease Role included), applied for real by the first test. Failover times are printed (pytest -s).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubelm_contract import keys, queues
from kubelm_devcluster.operator import service_account_kubeconfig
from kubelm_operator.spec import parse_languagemodel
from support import REPO, ClusterEnv, eventually

from .conftest import GROUP, OPERATOR_NAMESPACE, SERVICE_ACCOUNT, VERSION, Api, OperatorProcess
from .test_languagemodel_operator import _management

pytestmark = [pytest.mark.cluster, pytest.mark.services, pytest.mark.slow]

SMALL = {"baseModel": {"hub": {"id": "openai-community/gpt2"}}, "dataset": {"train": "/data/train.txt"},
         "resources": {"cpu": "10m", "memory": "32Mi"}, "backoffLimit": 0}

LEASE_DURATION, LEASE_RENEW = 12, 2  # the shipped defaults: the failover times printed are the real ones


@pytest.fixture(scope="module")
def ha_applied(cluster: ClusterEnv) -> Iterator[str]:
    """`kubectl apply --server-side -k manifests/install-ha`, once, as a user installs it (the first test
    of a run sees a cluster without kubelm)."""
    out = cluster.kubectl("apply", "--server-side", "--field-manager=kubelm-tests", "-k",
                          str(REPO / "manifests" / "install-ha")).stdout
    yield out
    # No kubelet runs its pods; the tests' own operator processes stand in for it.
    cluster.kubectl("delete", "-n", OPERATOR_NAMESPACE, "deployment/kubelm-operator", "secret/kubelm-connections",
                    "--ignore-not-found", "--wait=false")


def _built_in_kinds(cluster: ClusterEnv) -> set[tuple[str, str]]:
    """(group, kind) the API server serves without any CRD: what an empty cluster knows."""
    crds = json.loads(cluster.kubectl("get", "crd", "-o", "json").stdout)["items"]
    from_crds = {(c["spec"]["group"], c["spec"]["names"]["kind"]) for c in crds}
    served = set()
    for line in cluster.kubectl("api-resources", "--no-headers", "-o", "wide").stdout.splitlines():
        # NAME [SHORTNAMES] APIVERSION NAMESPACED KIND VERBS [CATEGORIES]
        fields = line.split()
        index = next(i for i, f in enumerate(fields) if f in ("true", "false"))
        api_version, kind = fields[index - 1], fields[index + 1]
        served.add((api_version.rpartition("/")[0], kind))
    return served - from_crds


def test_install_ha_applies_in_one_go_with_only_built_in_kinds(cluster: ClusterEnv, ha_applied: str) -> None:
    rendered = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / "manifests" / "install-ha"))
                                              .stdout) if d]
    lines = [line for line in ha_applied.splitlines() if line.strip()]
    assert len(lines) == len(rendered) and all(line.endswith(" serverside-applied") for line in lines), ha_applied
    # An object of a kind whose CRD comes in the same apply fails on an empty cluster ("no matches for kind"):
    # the CRDs may be there, objects of their kinds may not.
    kinds = {(d["apiVersion"].rpartition("/")[0], d["kind"]) for d in rendered}
    assert kinds <= _built_in_kinds(cluster), kinds - _built_in_kinds(cluster)

    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBELM_LEADER_ELECTION"]["value"] == "true"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "KUBELM_PEERING" not in env


@pytest.mark.parametrize(("verb", "namespace", "allowed"), [
    ("get", OPERATOR_NAMESPACE, True), ("create", OPERATOR_NAMESPACE, True), ("update", OPERATOR_NAMESPACE, True),
    ("delete", OPERATOR_NAMESPACE, False), ("list", OPERATOR_NAMESPACE, False), ("get", "default", False),
])
def test_the_lease_role_grants_only_the_operators_namespace(cluster: ClusterEnv, ha_applied: str, verb: str,
                                                            namespace: str, allowed: bool) -> None:
    result = cluster.kubectl("auth", "can-i", verb, "leases.coordination.k8s.io", "-n", namespace,
                             f"--as=system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}", check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), (verb, namespace, result.stdout, result.stderr)


class Pair:
    """Operator processes sharing one Lease (a fresh name per test), each with its own identity."""

    def __init__(self, cluster: ClusterEnv, directory: Path, api: Api, **env: str):
        self.api, self.lease = api, f"t-{uuid.uuid4().hex[:8]}"
        kubeconfig = service_account_kubeconfig(lambda *a, input=None: cluster.kubectl(*a, input=input).stdout,
                                                Path(cluster.kubeconfig), directory / "kubeconfig")
        common = {"KUBELM_LEADER_ELECTION": "true", "KUBELM_LOG_FORMAT": "json", "KUBELM_LEASE_NAME": self.lease,
                  "POD_NAMESPACE": OPERATOR_NAMESPACE, "KUBELM_PROGRESS_INTERVAL_SECONDS": "1",
                  "KUBELM_RUNTIME_IMAGE": "kubelm/runtime:test", "KUBELM_AMQP_URL": cluster.amqp_url,
                  "KUBELM_RABBITMQ_API_URL": cluster.rabbitmq_api_url, **env}
        self.processes: dict[str, OperatorProcess] = {}
        for who in ("op-a", "op-b"):
            (directory / who).mkdir()
            self.processes[who] = OperatorProcess(kubeconfig, cluster.redis_url, directory / who,
                                                  env={**common, "POD_NAME": who})

    def start(self) -> None:
        for process in self.processes.values():
            process.start()
        for process in self.processes.values():
            process.wait_healthy()  # the standby too: alive while it waits

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()

    def lease_spec(self) -> Any:
        """The Lease's spec; None while there is no Lease."""
        coordination = client.CoordinationV1Api(self.api.api_client)
        try:
            return coordination.read_namespaced_lease(self.lease, OPERATOR_NAMESPACE).spec
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def holder(self) -> str | None:
        spec = self.lease_spec()
        return None if spec is None else spec.holder_identity

    def leader(self) -> tuple[str, str]:
        eventually(lambda: self.holder() in self.processes, timeout=60, what="one of the two holds the Lease")
        active = str(self.holder())
        return active, next(w for w in self.processes if w != active)

    def log(self, who: str) -> str:
        process = self.processes[who]
        return process.log_file.read_text(errors="replace") if process.log_file.exists() else ""


@pytest.fixture
def pair(cluster: ClusterEnv, installed: None, ha_applied: str, api: Api,
         tmp_path: Path) -> Iterator[Pair]:
    pair = Pair(cluster, tmp_path, api)
    yield pair
    pair.stop()


def _role(process: OperatorProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{process.health_port}/healthz", timeout=5) as response:
        assert response.status == 200
        return str(json.loads(response.read())["leaderElection"]["role"])


def _job_made(api: Api, namespace: str, name: str) -> bool:
    try:
        api.batch.read_namespaced_job(f"{name}-train", namespace)
        return True
    except client.ApiException as e:
        if e.status == 404:
            return False
        raise


def _acted_on(log: str, namespace: str, name: str) -> bool:
    """Whether a line of the (JSON) log is about the object: kopf names it under "object"."""
    for line in log.splitlines():
        try:
            ref = json.loads(line).get("object") or {}
        except ValueError:  # a traceback's lines
            continue
        if ref.get("namespace") == namespace and ref.get("name") == name:
            return True
    return False


def _takeover(pair: Pair, api: Api, namespace: str, job: str, standby: str, timeout: float) -> tuple[float, float]:
    """Creates a TrainingJob while the old leader is gone, then (when, monotonic) the standby held the Lease
    and (when) it made the job's Job: only a leader can."""
    api.create_tj(namespace, job, SMALL)
    eventually(lambda: pair.holder() == standby, timeout=timeout, interval=0.1, what="the standby holds the Lease")
    held = time.monotonic()
    eventually(lambda: _job_made(api, namespace, job), timeout=60, interval=0.1, what=f"the new leader made {job}")
    return held, time.monotonic()


def test_exactly_one_acts_and_the_standby_takes_over_when_it_is_killed(pair: Pair, api: Api,
                                                                        namespace: str) -> None:
    pair.start()
    active, standby = pair.leader()
    assert _role(pair.processes[active]) == "leader" and _role(pair.processes[standby]) == "standby"

    api.create_tj(namespace, "first", SMALL)
    eventually(lambda: _job_made(api, namespace, "first"), timeout=60, what="the leader made the first Job")
    eventually(lambda: _acted_on(pair.log(active), namespace, "first"), timeout=30, what="the leader's log names it")
    assert not _acted_on(pair.log(standby), namespace, "first"), pair.log(standby)
    eventually(lambda: f"standby while {active} holds Lease {OPERATOR_NAMESPACE}/{pair.lease}" in pair.log(standby),
               timeout=30, what="the standby says whom it waits for")

    killed = time.monotonic()
    pair.processes[active].kill()
    # Created while nobody acts: only the new leader can make its Job.
    held, reconciled = _takeover(pair, api, namespace, "second", standby, LEASE_DURATION + 30)
    print(f"\nSIGKILL failover (lease {LEASE_DURATION} s, renew {LEASE_RENEW} s): new holder after "
          f"{held - killed:.1f} s, first reconcile after {reconciled - killed:.1f} s")
    assert _role(pair.processes[standby]) == "leader"
    assert pair.lease_spec().lease_transitions == 1
    # kopf resumes every object at start: the one made before the failover is looked at again.
    eventually(lambda: _acted_on(pair.log(standby), namespace, "first"), timeout=30, what="first resumed")

    # The killed one comes back as standby and stays out.
    pair.processes[active].start()
    pair.processes[active].wait_healthy()
    assert _role(pair.processes[active]) == "standby"
    api.create_tj(namespace, "third", SMALL)
    eventually(lambda: _job_made(api, namespace, "third"), timeout=60, what="the leader made the third Job")
    eventually(lambda: _acted_on(pair.log(standby), namespace, "third"), timeout=30, what="the leader's log names it")
    assert not _acted_on(pair.log(active), namespace, "third"), pair.log(active)


@pytest.fixture
def long_lease_pair(cluster: ClusterEnv, installed: None, ha_applied: str, api: Api,
                    tmp_path: Path) -> Iterator[Pair]:
    # Expiry would take a minute: a takeover within the waits below can come only from the release.
    pair = Pair(cluster, tmp_path, api, KUBELM_LEASE_DURATION_SECONDS="60")
    yield pair
    pair.stop()


def test_a_stopped_leader_releases_the_lease_and_the_standby_takes_over_at_once(long_lease_pair: Pair, api: Api,
                                                                                 namespace: str) -> None:
    pair = long_lease_pair
    pair.start()
    active, standby = pair.leader()
    eventually(lambda: f"standby while {active} holds" in pair.log(standby), timeout=30, what="the other waits")

    stopped = time.monotonic()
    process = pair.processes[active]
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(timeout=60) == 0
    exited = time.monotonic()
    assert f"Leader election: released Lease {OPERATOR_NAMESPACE}/{pair.lease}." in pair.log(active)
    held, reconciled = _takeover(pair, api, namespace, "after-stop", standby, 20)
    print(f"\nSIGTERM failover: old leader exited after {exited - stopped:.1f} s, new holder after "
          f"{held - stopped:.1f} s, first reconcile after {reconciled - stopped:.1f} s")


def test_a_leader_that_sees_another_holder_exits_at_once_with_an_error(pair: Pair, api: Api) -> None:
    process = pair.processes["op-a"]
    process.start()
    process.wait_healthy()
    eventually(lambda: pair.holder() == "op-a", timeout=30, what="op-a holds the Lease")
    client.CoordinationV1Api(api.api_client).patch_namespaced_lease(
        pair.lease, OPERATOR_NAMESPACE, {"spec": {"holderIdentity": "someone-else"}})
    assert process.process is not None
    try:
        code = process.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after another holder showed up:\n{process.log_tail()}")
    assert code == 1
    assert f"Lease {OPERATOR_NAMESPACE}/{pair.lease} is now held by someone-else; exiting at once" in process.log_tail()


def _children(api: Api, namespace: str) -> set[tuple[str, str, str]]:
    """(kind, name, owner uid) of everything in the namespace carrying the operator's managed-by label."""
    selector = "app.kubernetes.io/managed-by=kubelm-operator"
    listed = {"Deployment": api.apps.list_namespaced_deployment, "ConfigMap": api.core.list_namespaced_config_map,
              "Secret": api.core.list_namespaced_secret, "Service": api.core.list_namespaced_service,
              "Job": api.batch.list_namespaced_job}
    found = set()
    for kind, list_ in listed.items():
        for o in list_(namespace, label_selector=selector).items:
            if o.metadata.deletion_timestamp is None:
                owners = o.metadata.owner_references or []
                found.add((kind, o.metadata.name, str(owners[0].uid) if owners else ""))
    return found


def _model_queues(cluster: ClusterEnv, namespace: str) -> dict[str, dict[str, Any]]:
    listed = _management(cluster, "/api/queues/%2F?columns=name,arguments")
    return {q["name"]: q["arguments"] for q in listed if q["name"].startswith(f"kubelm.{namespace}.")}


def test_two_replicas_killed_twenty_times_converge_to_the_undisturbed_state_and_clean_up(
        cluster: ClusterEnv, installed: None, ha_applied: str, api: Api, tmp_path: Path, namespace: str,
        redis_client: Any) -> None:
    """50 LanguageModels and 10 TrainingJobs applied in a burst to two replicas under leader election, children
    deleted by hand, the processes SIGKILLed at random moments 20 times (each started again at once): the end
    state is what an undisturbed run makes, and deleting it all leaves nothing in the API, RabbitMQ or Redis."""
    pair = Pair(cluster, tmp_path, api, KUBELM_LEASE_DURATION_SECONDS="3", KUBELM_LEASE_RENEW_SECONDS="1",
                KUBELM_AUTOSCALE_INTERVAL_SECONDS="2", KUBELM_RESYNC_INTERVAL_SECONDS="30",
                KUBELM_LOG_FORMAT="text")
    rng = random.Random(14)
    kills: list[str] = []

    def chaos() -> None:
        """SIGKILL one of the two (the leader twice as often), started again at once."""
        active = pair.holder()
        who = active if active in pair.processes and rng.random() < 2 / 3 else rng.choice(list(pair.processes))
        time.sleep(rng.uniform(0, 0.4))
        pair.processes[who].kill()
        pair.processes[who].start()
        kills.append(who)

    started = time.monotonic()
    try:
        pair.start()
        models = {f"lm-{i:02d}": {"model": {"hub": {"id": "gpt2"}}, "resources": {"cpu": "10m", "memory": "32Mi"},
                                  "gateway": {"enabled": False},
                                  "queue": {"maxLength": 10 + i} if i % 2 else {},
                                  "autoscaling": {"engine": "none", "minReplicas": 0}} for i in range(50)}
        jobs = [f"tj-{i}" for i in range(10)]
        burst: list[tuple[str, str]] = [("lm", n) for n in models] + [("tj", n) for n in jobs]
        rng.shuffle(burst)
        for i, (kind, name) in enumerate(burst):
            if kind == "lm":
                api.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", {
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "LanguageModel", "metadata": {"name": name},
                    "spec": models[name]})
            else:
                # Suspended: no pod takes room on the test cluster's node, which no kubelet empties again.
                api.create_tj(namespace, name, {**SMALL, "suspend": True})
            if i % 4 == 3:  # 15 kills during the burst
                chaos()

        def converged() -> bool:
            lms = api.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels")["items"]
            tjs = api.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs")["items"]
            def reason(o: dict[str, Any]) -> str | None:
                return ((o.get("status") or {}).get("conditions") or [{}])[0].get("reason")
            return len(lms) == 50 and all(reason(o) == "ScaledToZero" for o in lms) and \
                len(tjs) == 10 and all(reason(o) == "Suspended" for o in tjs)
        eventually(converged, timeout=300, interval=1, what="every object reconciled once")

        # Children deleted by hand, while the kills go on.
        for name in rng.sample(sorted(models), 5):
            api.apps.delete_namespaced_deployment(f"{name}-worker", namespace)
            api.core.delete_namespaced_config_map(f"{name}-serve", namespace)
        for name in rng.sample(jobs, 3):
            api.batch.delete_namespaced_job(f"{name}-train", namespace, propagation_policy="Background")
        for _ in range(19 - len(kills)):
            chaos()
        assert len(kills) == 19  # the 20th comes while everything is being deleted

        uids = {o["metadata"]["name"]: o["metadata"]["uid"] for plural in ("languagemodels", "trainingjobs")
                for o in api.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]}
        expected = set()
        for name in models:
            expected |= {("Deployment", f"{name}-worker", uids[name]), ("ConfigMap", f"{name}-serve", uids[name]),
                         ("Secret", f"{name}-serve-env", uids[name])}
        for name in jobs:
            # One worker each: no rendezvous Service.
            expected |= {(kind, f"{name}-train", uids[name]) for kind in ("Job", "ConfigMap")}
            expected.add(("Secret", f"{name}-train-env", uids[name]))
        differences: list[str] = []

        def same_children() -> bool:
            found = _children(api, namespace)
            differences[:] = [f"missing {sorted(expected - found)}", f"unexpected {sorted(found - expected)}"]
            return found == expected and converged()
        try:
            eventually(same_children, timeout=300, interval=1,
                       what="the same children as an undisturbed run: none missing, duplicated or orphaned")
        except AssertionError as e:
            raise AssertionError(f"{e}: {'; '.join(differences)}") from None
        converged_after = time.monotonic() - started

        wanted_queues = {}
        for name, spec in models.items():
            queue_spec = parse_languagemodel(spec).queue
            wanted_queues[queues.request_queue(namespace, name)] = queues.request_queue_arguments(
                namespace, name, queue_spec)
            wanted_queues[queues.dead_letter_queue(namespace, name)] = None
        found = _model_queues(cluster, namespace)
        assert sorted(found) == sorted(wanted_queues)
        for name, arguments in wanted_queues.items():
            if arguments is not None:
                assert found[name] == arguments, name
        entries = {k.decode() for k in redis_client.hkeys(keys.MODEL_REGISTRY)
                   if k.decode().startswith(f"{namespace}/")}
        assert entries == {f"{namespace}/{n}" for n in models}

        # Then everything is deleted, with the kills still coming now and then.
        for plural in ("languagemodels", "trainingjobs"):
            api.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        chaos()
        assert len(kills) == 20

        def all_gone() -> bool:
            left = sum(len(api.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, p)["items"])
                       for p in ("languagemodels", "trainingjobs"))
            return left == 0 and not _children(api, namespace)
        eventually(all_gone, timeout=300, interval=1, what="every object and child gone")
        assert _model_queues(cluster, namespace) == {}
        assert not [k for k in redis_client.hkeys(keys.MODEL_REGISTRY) if k.decode().startswith(f"{namespace}/")]
        left_keys = [k for k in redis_client.scan_iter(match=f"*{namespace}/*", count=1000)]
        assert left_keys == [], left_keys
        print(f"\nchaos: {len(kills)} SIGKILLs ({kills.count('op-a')} op-a, {kills.count('op-b')} op-b), "
              f"50 LanguageModels and 10 TrainingJobs, {len(expected)} children converged after "
              f"{converged_after:.0f} s, {len(found)} queues with the contract's arguments, "
              f"all deleted after {time.monotonic() - started:.0f} s with nothing left")
    finally:
        pair.stop()
