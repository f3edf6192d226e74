"""The operator process reconciling TrainingJobs on the real control plane (RBAC enforced) and Redis.

Pods have no kubelet here: tests report what a kubelet would (pod status), and the real
Job controller, scheduler and garbage collector do the rest.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from kubelm_contract import keys
from kubelm_operator.main import FINALIZER
from kubelm_runtime.progress import ProgressReporter
from support import REPO, ClusterEnv, eventually

from .conftest import GROUP, OPERATOR_NAMESPACE, SERVICE_ACCOUNT, VERSION, Api, OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.services]

SMALL = {"baseModel": {"hub": {"id": "openai-community/gpt2"}}, "dataset": {"train": "/data/train.txt"},
         "resources": {"cpu": "10m", "memory": "32Mi"}, "backoffLimit": 0}


def _job_name(name: str) -> str:
    return f"{name}-train"


def _wait_pods(api: Api, namespace: str, name: str, count: int = 1) -> list[Any]:
    eventually(lambda: len(api.pods(namespace, _job_name(name))) >= count, timeout=120,
               what=f"{count} pod(s) of {name} admitted and created")
    return api.pods(namespace, _job_name(name))


def _event_reasons(api: Api, namespace: str, name: str) -> set[str]:
    return {e.reason for e in api.events(namespace, name)}


def test_trainingjob_trains_to_success_in_a_restricted_namespace(
        running_operator: OperatorProcess, api: Api, cluster: ClusterEnv, restricted_namespace: str) -> None:
    ns, name = restricted_namespace, "story"
    tj = api.create_tj(ns, name, SMALL)
    owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "name": name,
             "uid": tj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    pods = _wait_pods(api, ns, name)  # Pod Security Admission (restricted) let the Job controller create it
    job = api.batch.read_namespaced_job(_job_name(name), ns)
    config_map = api.core.read_namespaced_config_map(_job_name(name), ns)
    secret = api.core.read_namespaced_secret(f"{name}-train-env", ns)
    for child in (job, config_map, secret):
        assert [r.to_dict() for r in child.metadata.owner_references] == [
            {"api_version": owner["apiVersion"], "kind": "TrainingJob", "name": name, "uid": owner["uid"],
             "controller": True, "block_owner_deletion": True}]
    assert json.loads(config_map.data["train.json"])["jobId"] == f"{ns}/{name}"
    pod_spec = pods[0].spec
    assert pod_spec.security_context.run_as_non_root
    assert pod_spec.containers[0].security_context.read_only_root_filesystem
    assert pod_spec.containers[0].image == "kubelm/runtime:test"

    api.run_pod(ns, pods[0].metadata.name)
    api.wait_status(ns, name, lambda s: s.get("phase") == "Running", "phase Running")
    # Reported the way the trainer reports it: the runtime's own reporter, to the key the job's id names.
    reporter = ProgressReporter(cluster.redis_url, f"{ns}/{name}")
    assert reporter.report({"phase": "Running", "step": 5, "totalSteps": 10, "epoch": 0.5, "loss": 2.5,
                            "tokensPerSecond": 900.0, "percent": 50.0, "etaSeconds": 12, "worldSize": 1}, force=True)
    status = api.wait_status(ns, name, lambda s: (s.get("progress") or {}).get("step") == 5, "progress mirrored")
    assert status["progress"] == {"step": 5, "totalSteps": 10, "epoch": 0.5, "loss": 2.5, "tokensPerSecond": 900.0,
                                  "percent": 50.0, "etaSeconds": 12}

    artifact = {"uri": f"artifact://{ns}/{name}@1", "version": 1, "digest": "sha256:" + "ab" * 32,
                "metrics": {"evalLoss": 1.25}}
    assert reporter.report({"phase": "Succeeded", "step": 10, "totalSteps": 10, "percent": 100.0, "etaSeconds": 0,
                            "loss": 1.5, "artifact": artifact}, force=True)
    api.finish_pod(ns, pods[0].metadata.name, exit_code=0, reason="Completed")
    status = api.wait_status(ns, name, lambda s: s.get("phase") == "Succeeded", "phase Succeeded")
    assert status["artifact"] == artifact
    assert status["progress"]["step"] == 10 and status["attempts"] == 1
    assert status["startTime"] and status["completionTime"]
    ready = api.condition(ns, name, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "ArtifactPublished", 1)
    eventually(lambda: {"Running", "Succeeded"} <= _event_reasons(api, ns, name), timeout=90,
               what="an Event for each transition")


def test_failure_shows_oomkilled_and_the_trainers_last_lines(
        running_operator: OperatorProcess, api: Api, namespace: str, redis_client: Any) -> None:
    name = "oom"
    api.create_tj(namespace, name, SMALL)
    pod = _wait_pods(api, namespace, name)[0]
    redis_client.set(keys.progress(f"{namespace}/{name}"), json.dumps(
        {"phase": "Failed", "step": 3, "message": "RuntimeError: DefaultCPUAllocator: can't allocate memory"}))
    api.finish_pod(namespace, pod.metadata.name, exit_code=137, reason="OOMKilled",
                   message="loading weights\nstep 3 loss 4.1")
    status = api.wait_status(namespace, name, lambda s: s.get("phase") == "Failed", "phase Failed")
    stalled = api.condition(namespace, name, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "BackoffLimitExceeded"
    expected = f"pod {pod.metadata.name}: OOMKilled (exit code 137): loading weights | step 3 loss 4.1"
    assert expected in stalled["message"]
    assert "trainer: RuntimeError: DefaultCPUAllocator" in stalled["message"]
    assert status["completionTime"] and api.condition(namespace, name, "Ready")["status"] == "False"
    eventually(lambda: any(e.reason == "Failed" and e.type == "Warning" and "OOMKilled" in e.message
                           for e in api.events(namespace, name)), timeout=90, what="a Warning Event naming OOMKilled")


def test_suspend_and_resume(running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    name = "pausable"
    api.create_tj(namespace, name, {**SMALL, "suspend": True})
    api.wait_status(namespace, name, lambda s: s.get("phase") == "Suspended", "phase Suspended")
    assert api.batch.read_namespaced_job(_job_name(name), namespace).spec.suspend is True
    assert api.pods(namespace, _job_name(name)) == []

    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", name,
                                              {"spec": {"suspend": False}})
    pod = _wait_pods(api, namespace, name)[0]
    assert api.batch.read_namespaced_job(_job_name(name), namespace).spec.suspend is False
    api.run_pod(namespace, pod.metadata.name)
    api.wait_status(namespace, name, lambda s: s.get("phase") == "Running", "phase Running after resume")

    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", name,
                                              {"spec": {"suspend": True}})
    eventually(lambda: api.batch.read_namespaced_job(_job_name(name), namespace).spec.suspend is True, timeout=120,
               what="Job suspended again")


def test_two_workers_get_a_rendezvous_service_a_pod_per_rank_and_an_owned_claim(
        running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    name = "pair"
    tj = api.create_tj(namespace, name, {**SMALL, "workers": 2, "storage": {"type": "pvc", "size": "1Gi"}})
    pods = _wait_pods(api, namespace, name, count=2)
    ranks = sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert ranks == ["0", "1"]
    assert {p.spec.hostname for p in pods} == {"pair-train-0", "pair-train-1"}
    assert {p.spec.subdomain for p in pods} == {"pair-train"}
    service = api.core.read_namespaced_service("pair-train", namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    claim = api.core.read_namespaced_persistent_volume_claim("pair-checkpoints", namespace)
    assert claim.spec.access_modes == ["ReadWriteMany"]
    for child in (service, claim):
        assert child.metadata.owner_references[0].uid == tj["metadata"]["uid"]


def test_a_gpu_count_no_node_offers_is_stalled_with_the_schedulers_reason(
        running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    name = "greedy"
    api.create_tj(namespace, name, {**SMALL, "resources": {"cpu": "10m", "memory": "32Mi", "gpus": 4}})
    status = api.wait_status(namespace, name, lambda s: any(
        c["type"] == "Stalled" and c["reason"] == "Unschedulable" for c in s.get("conditions", [])), "Unschedulable")
    assert status["phase"] == "Pending"
    assert "nvidia.com/gpu" in api.condition(namespace, name, "Stalled")["message"]
    eventually(lambda: "Unschedulable" in _event_reasons(api, namespace, name), timeout=90, what="Warning Event")


def test_a_missing_claim_is_named_then_the_job_starts_once_it_exists(
        running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    name = "needs-data"
    api.create_tj(namespace, name, {**SMALL, "dataset": {"train": "pvc://corpus/train.txt"}})
    api.wait_status(namespace, name, lambda s: any(
        c["type"] == "Stalled" and c["reason"] == "ClaimNotFound" for c in s.get("conditions", [])), "ClaimNotFound")
    message = api.condition(namespace, name, "Stalled")["message"]
    assert message.startswith("spec.dataset.train: PersistentVolumeClaim 'corpus' not found")
    with pytest.raises(ApiException):
        api.batch.read_namespaced_job(_job_name(name), namespace)
    eventually(lambda: any(e.reason == "ClaimNotFound" and "spec.dataset.train" in e.message
                           for e in api.events(namespace, name)), timeout=90, what="an Event naming the field")

    # The operator keeps reconciling everything else meanwhile.
    api.create_tj(namespace, "healthy", {**SMALL, "suspend": True})
    api.wait_status(namespace, "healthy", lambda s: s.get("phase") == "Suspended", "a healthy job beside it")

    api.core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "corpus"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    eventually(lambda: len(api.batch.list_namespaced_job(namespace).items) == 2, timeout=120,
               what="the Job created once the claim exists")
    volumes = api.batch.read_namespaced_job(_job_name(name), namespace).spec.template.spec.volumes
    assert any(v.persistent_volume_claim and v.persistent_volume_claim.claim_name == "corpus" for v in volumes)


def test_training_job_ref_waits_then_trains_from_the_artifact(
        running_operator: OperatorProcess, api: Api, namespace: str, redis_client: Any) -> None:
    api.create_tj(namespace, "second", {**SMALL, "baseModel": {"trainingJobRef": {"name": "first"}}})
    api.wait_status(namespace, "second", lambda s: any(
        c["type"] == "Stalled" and c["reason"] == "TrainingJobNotFound" for c in s.get("conditions", [])),
        "TrainingJobNotFound")

    api.create_tj(namespace, "first", SMALL)
    api.wait_status(namespace, "second", lambda s: any(
        c["type"] == "Reconciling" and c["reason"] == "WaitingForTrainingJob" and c["status"] == "True"
        for c in s.get("conditions", [])), "waiting for the first job")
    assert not api.batch.list_namespaced_job(namespace, label_selector="kubelm.io/trainingjob=second").items

    pod = _wait_pods(api, namespace, "first")[0]
    redis_client.set(keys.progress(f"{namespace}/first"), json.dumps({"phase": "Succeeded", "artifact": {
        "uri": f"artifact://{namespace}/first@7", "version": 7, "digest": "sha256:00"}}))
    api.finish_pod(namespace, pod.metadata.name, exit_code=0, reason="Completed")
    eventually(lambda: bool(api.batch.list_namespaced_job(namespace, label_selector="kubelm.io/trainingjob=second")
                            .items), timeout=120, what="the second job created once the first succeeded")
    config = api.core.read_namespaced_config_map("second-train", namespace).data["train.json"]
    assert json.loads(config)["baseModel"] == {"artifact": f"artifact://{namespace}/first@7"}


def test_training_job_ref_to_a_failed_job_is_stalled(running_operator: OperatorProcess, api: Api,
                                                     namespace: str) -> None:
    api.create_tj(namespace, "broken", SMALL)
    pod = _wait_pods(api, namespace, "broken")[0]
    api.finish_pod(namespace, pod.metadata.name, exit_code=1, reason="Error", message="ValueError: bad data")
    api.wait_status(namespace, "broken", lambda s: s.get("phase") == "Failed", "first job failed")
    api.create_tj(namespace, "after", {**SMALL, "baseModel": {"trainingJobRef": {"name": "broken"}}})
    api.wait_status(namespace, "after", lambda s: any(
        c["type"] == "Stalled" and c["reason"] == "TrainingJobFailed" for c in s.get("conditions", [])),
        "TrainingJobFailed")
    message = api.condition(namespace, "after", "Stalled")["message"]
    assert message.startswith("spec.baseModel.trainingJobRef: TrainingJob 'broken' failed:")
    assert "ValueError: bad data" in message


def test_deletion_removes_the_progress_key_and_the_children(
        running_operator: OperatorProcess, api: Api, namespace: str, redis_client: Any) -> None:
    name = "short-lived"
    api.create_tj(namespace, name, {**SMALL, "suspend": True})
    api.wait_status(namespace, name, lambda s: s.get("phase") == "Suspended", "phase Suspended")
    assert api.tj(namespace, name)["metadata"]["finalizers"] == ["kubelm.io/cleanup"]
    key = keys.progress(f"{namespace}/{name}")
    redis_client.set(key, json.dumps({"phase": "Running", "step": 1}))
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", name)

    def gone() -> bool:
        try:
            api.tj(namespace, name)
            return False
        except ApiException as e:
            return e.status == 404
    eventually(gone, timeout=120, what="TrainingJob removed after its finalizer ran")
    assert redis_client.exists(key) == 0
    eventually(lambda: not api.batch.list_namespaced_job(namespace).items
               and not api.core.list_namespaced_config_map(namespace, label_selector="kubelm.io/trainingjob").items,
               timeout=120, what="children garbage-collected through their owner references")


def test_applying_twice_changes_nothing_and_spec_is_never_written(
        running_operator: OperatorProcess, api: Api, cluster: ClusterEnv, namespace: str) -> None:
    manifest = json.dumps({"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob",
                           "metadata": {"name": "steady", "namespace": namespace}, "spec": {**SMALL, "suspend": True}})
    cluster.kubectl("apply", "--server-side", "--field-manager=gitops", "-f", "-", input=manifest)
    api.wait_status(namespace, "steady", lambda s: s.get("phase") == "Suspended", "phase Suspended")
    before = api.tj(namespace, "steady")
    cluster.kubectl("apply", "--server-side", "--field-manager=gitops", "-f", "-", input=manifest)
    assert api.tj(namespace, "steady")["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    for entry in before["metadata"]["managedFields"]:
        if entry["manager"] == "kubelm-operator":
            assert "f:spec" not in entry.get("fieldsV1", {}), entry
    spec_owners = {e["manager"] for e in before["metadata"]["managedFields"] if "f:spec" in e.get("fieldsV1", {})}
    assert spec_owners == {"gitops"}
    # Of the object's metadata the operator writes its finalizer alone: kopf's bookkeeping stays in memory.
    assert before["metadata"]["finalizers"] == ["kubelm.io/cleanup"]
    assert not [key for key in before["metadata"].get("annotations") or {} if key.startswith("kubelm.io/")]


def test_the_finalizer_comes_from_admission_and_the_operator_restores_it(
        running_operator: OperatorProcess, api: Api, cluster: ClusterEnv, namespace: str) -> None:
    manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob",
                "metadata": {"name": "held", "namespace": namespace, "finalizers": ["example.com/keep"]},
                "spec": {**SMALL, "suspend": True}}
    # The API server adds it as it stores the object (manifests/admission), keeping others: a dry run shows it.
    stored = json.loads(cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                                        input=json.dumps(manifest)).stdout)
    assert stored["metadata"]["finalizers"] == ["example.com/keep", FINALIZER]
    # Where admission did not (a cluster without the policy, or removed by hand), the operator adds it.
    api.create_tj(namespace, "held", {**SMALL, "suspend": True})
    api.wait_status(namespace, "held", lambda s: s.get("phase") == "Suspended", "phase Suspended")
    cluster.kubectl("patch", "trainingjob", "held", "-n", namespace, "--type=json",
                    "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')
    eventually(lambda: api.tj(namespace, "held")["metadata"].get("finalizers") == [FINALIZER], timeout=60,
               what="the operator's finalizer back")


def test_status_is_written_only_when_it_changes(operator: OperatorProcess, api: Api, namespace: str) -> None:
    # An operator of its own, watching only this namespace, so that its metrics count this object alone.
    operator.stop()
    operator.start(KUBELM_NAMESPACES=namespace)
    try:
        operator.wait_healthy()
        # A job waiting for a claim is looked at again every second; nothing changes, so nothing is written.
        api.create_tj(namespace, "waiting", {**SMALL, "dataset": {"train": "pvc://later/train.txt"}})
        api.wait_status(namespace, "waiting", lambda s: any(
            c["type"] == "Stalled" and c["reason"] == "ClaimNotFound" for c in s.get("conditions", [])),
            "ClaimNotFound")
        version = api.tj(namespace, "waiting")["metadata"]["resourceVersion"]
        writes = operator.metric("kubelm_operator_status_writes_total", kind="TrainingJob")

        def ticks() -> float:
            try:
                return operator.metric("kubelm_operator_reconciles_total", kind="TrainingJob", trigger="timer",
                                       result="ok")
            except LookupError:  # the timer's first tick waits an interval
                return 0
        eventually(lambda: ticks() >= 3, timeout=120, what="three timer reconciliations")
        assert operator.metric("kubelm_operator_status_writes_total", kind="TrainingJob") == writes
        assert api.tj(namespace, "waiting")["metadata"]["resourceVersion"] == version
    finally:
        operator.stop()
        operator.start()


def _children_of(api: Api, namespace: str) -> dict[str, list[Any]]:
    selector = "app.kubernetes.io/managed-by=kubelm-operator"
    return {
        "Job": api.batch.list_namespaced_job(namespace, label_selector=selector).items,
        "ConfigMap": api.core.list_namespaced_config_map(namespace, label_selector=selector).items,
        "Secret": api.core.list_namespaced_secret(namespace, label_selector=selector).items,
    }


@pytest.mark.slow
def test_operator_killed_at_random_moments_during_20_creations(
        running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    rng = random.Random(20261130)
    names = [f"tj-{i:02d}" for i in range(20)]
    for i, name in enumerate(names):
        api.create_tj(namespace, name, {**SMALL, "suspend": True})
        if i % 3 == 2:
            # Let it get somewhere first: a kill at a random point of its reconciliations.
            time.sleep(rng.uniform(0, 0.8))
            running_operator.kill()
            running_operator.start()
    running_operator.wait_healthy()
    for name in names:
        api.wait_status(namespace, name, lambda s: s.get("phase") == "Suspended", "phase Suspended", timeout=180)
    uids = {api.tj(namespace, n)["metadata"]["uid"]: n for n in names}
    for kind, objects in _children_of(api, namespace).items():
        assert len(objects) == len(names), kind
        owners = sorted(uids[o.metadata.owner_references[0].uid] for o in objects)
        assert owners == sorted(names), f"{kind}: one per TrainingJob, none orphaned"
        assert {o.metadata.name for o in objects} == {f"{n}-train{'-env' if kind == 'Secret' else ''}" for n in names}


def test_stuck_finalizer_is_reported_and_finishes_once_redis_is_back(
        operator: OperatorProcess, api: Api, namespace: str) -> None:
    operator.stop()
    operator.start(KUBELM_REDIS_URL="redis://127.0.0.1:1/0")
    try:
        operator.wait_healthy()
        api.create_tj(namespace, "sticky", {**SMALL, "suspend": True})
        api.wait_status(namespace, "sticky", lambda s: s.get("phase") == "Suspended", "phase Suspended")
        api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", "sticky")
        status = api.wait_status(namespace, "sticky", lambda s: any(
            c["type"] == "Stalled" and c["reason"] == "CleanupFailed" for c in s.get("conditions", [])),
            "CleanupFailed condition")
        assert status["phase"] == "Suspended"  # the rest of the status is kept
        assert "remove the finalizer by hand" in api.condition(namespace, "sticky", "Stalled")["message"]
        eventually(lambda: "CleanupFailed" in _event_reasons(api, namespace, "sticky"), timeout=90,
                   what="a Warning Event about the finalizer")
        assert api.tj(namespace, "sticky")["metadata"]["finalizers"] == ["kubelm.io/cleanup"]
    finally:
        operator.stop()
        operator.start()
    operator.wait_healthy()

    def gone() -> bool:
        try:
            api.tj(namespace, "sticky")
            return False
        except ApiException as e:
            return e.status == 404
    eventually(gone, timeout=90, what="deletion finished once Redis is reachable")


@pytest.mark.parametrize(("verb", "resource", "allowed"), [
    ("create", "jobs.batch", True), ("patch", "jobs.batch", True), ("watch", "pods", True),
    ("create", "configmaps", True), ("patch", "secrets", True), ("get", "persistentvolumeclaims", True),
    ("patch", "trainingjobs.kubelm.io/status", True), ("create", "events", True),
    ("delete", "jobs.batch", False), ("get", "secrets", True), ("list", "secrets", False),
    ("watch", "secrets", False), ("delete", "secrets", False), ("delete", "configmaps", False),
    ("watch", "configmaps", True), ("delete", "services", True),
    ("update", "trainingjobs.kubelm.io", False), ("create", "pods", False), ("delete", "trainingjobs.kubelm.io", False),
    ("create", "deployments.apps", True), ("patch", "deployments.apps/scale", True),
    ("delete", "deployments.apps", True), ("update", "deployments.apps", False),
    ("patch", "languagemodels.kubelm.io/status", True), ("delete", "languagemodels.kubelm.io", False),
    ("create", "scaledobjects.keda.sh", True), ("patch", "triggerauthentications.keda.sh", True),
    ("delete", "scaledobjects.keda.sh", True), ("delete", "pods", False),
    ("create", "clusterroles.rbac.authorization.k8s.io", False),
])
def test_shipped_roles_grant_exactly_what_the_operator_uses(cluster: ClusterEnv, installed: None, verb: str,
                                                             resource: str, allowed: bool) -> None:
    result = cluster.kubectl("auth", "can-i", verb, resource, "-A",
                             f"--as=system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}", check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, result.stdout, result.stderr)


def test_install_manifests_pass_server_side_dry_run(cluster: ClusterEnv, installed: None) -> None:
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=kubelm-tests", "-k",
                          str(REPO / "manifests" / "install")).stdout
    assert "deployment.apps/kubelm-operator serverside-applied (server dry run)" in out
    # manifests/install-ha is applied for real in test_leader_election.
