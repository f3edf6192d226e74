"""Two operator processes under leader election on the real control plane: exactly one acts, the other
takes over when the first is killed or stopped, and manifests/install-ha applies in one go.

The processes authenticate as the shipped ServiceAccount with the roles of manifests/install-ha (the
Lease Role included), applied for real by the first test. Failover times are printed (pytest -s).
"""

from __future__ import annotations

import json
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

from kubelm_devcluster.operator import service_account_kubeconfig
from support import REPO, ClusterEnv, eventually

from .conftest import OPERATOR_NAMESPACE, SERVICE_ACCOUNT, Api, OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.services, pytest.mark.slow]

SMALL = {"baseModel": {"hub": {"id": "openai-community/gpt2"}}, "dataset": {"train": "/data/train.txt"},
         "resources": {"cpu": "10m", "memory": "32Mi"}, "backoffLimit": 0}

LEASE_DURATION, LEASE_RENEW = 15, 2  # the shipped defaults: the failover times printed are the real ones


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


def test_exactly_one_acts_and_the_standby_takes_over_when_it_is_killed(pair: Pair, api: Api,
                                                                        namespace: str) -> None:
    pair.start()
    active, standby = pair.leader()
    assert _role(pair.processes[active]) == "leader" and _role(pair.processes[standby]) == "standby"

    api.create_tj(namespace, "first", SMALL)
    eventually(lambda: _job_made(api, namespace, "first"), timeout=60, what="the leader made the first Job")
    eventually(lambda: _acted_on(pair.log(active), namespace, "first"), timeout=30, what="the leader's log names it")
    assert not _acted_on(pair.log(standby), namespace, "first"), pair.log(standby)
    assert f"standby while {active} holds Lease {OPERATOR_NAMESPACE}/{pair.lease}" in pair.log(standby)

    killed = time.monotonic()
    pair.processes[active].kill()
    # Created while nobody acts: only the new leader can make its Job.
    api.create_tj(namespace, "second", SMALL)
    eventually(lambda: pair.holder() == standby, timeout=LEASE_DURATION + 30, interval=0.1,
               what="the standby holds the Lease")
    held = time.monotonic()
    eventually(lambda: _job_made(api, namespace, "second"), timeout=60, interval=0.1,
               what="the new leader made the second Job")
    reconciled = time.monotonic()
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
    api.create_tj(namespace, "after-stop", SMALL)
    eventually(lambda: pair.holder() == standby, timeout=20, interval=0.1, what="the standby holds the Lease")
    held = time.monotonic()
    eventually(lambda: _job_made(api, namespace, "after-stop"), timeout=30, interval=0.1,
               what="the new leader made the Job")
    reconciled = time.monotonic()
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
