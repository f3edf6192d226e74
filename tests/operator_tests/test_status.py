"""TrainingJob status from observations: phases, conditions, progress, artifact and the Events they deserve."""

from __future__ import annotations

from typing import Any

from kubelm_operator.status import training as status
from kubelm_operator.status.conditions import find
from kubelm_operator.status.observed import ObservedJob, ObservedPod

T0, T1 = "2026-11-30T10:00:00Z", "2026-11-30T10:05:00Z"


def _job(**status_: Any) -> ObservedJob:
    return ObservedJob.from_body({"metadata": {"name": "j-train"}, "spec": {"suspend": status_.pop("suspend", False)},
                                  "status": status_})


def _pod(name: str = "j-train-0-abcde", **status_: Any) -> ObservedPod:
    return ObservedPod.from_body({"metadata": {"name": name, "creationTimestamp": T0}, "status": status_})


def _conditions(s: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in s["conditions"]}


def _obs(**kwargs: Any) -> status.Observation:
    return status.Observation(**{"generation": 1, "suspend": False, "workers": 1, **kwargs})


def test_new_job_is_pending_while_its_children_are_created() -> None:
    s = status.compute({}, _obs(), T0)
    assert s["phase"] == "Pending" and s["observedGeneration"] == 1
    assert _conditions(s) == {"Ready": ("False", "Creating"), "Reconciling": ("True", "Creating"),
                              "Stalled": ("False", "Pending")}
    assert all(c["lastTransitionTime"] == T0 and c["observedGeneration"] == 1 for c in s["conditions"])


def test_a_missing_claim_stalls_with_the_field_named() -> None:
    blocker = status.Blocker("ClaimNotFound", "spec.dataset.train: PersistentVolumeClaim 'data' not found", True)
    s = status.compute({}, _obs(blocker=blocker), T0)
    assert s["phase"] == "Pending"
    assert _conditions(s)["Stalled"] == ("True", "ClaimNotFound")
    assert find(s["conditions"], "Stalled")["message"].startswith("spec.dataset.train:")  # type: ignore[index]
    assert [e.reason for e in status.transitions({}, s)] == ["Pending", "ClaimNotFound"]


def test_waiting_for_another_job_is_not_stalled() -> None:
    blocker = status.Blocker("WaitingForTrainingJob", "waiting for TrainingJob 'first'", False)
    s = status.compute({}, _obs(blocker=blocker), T0)
    assert _conditions(s) == {"Ready": ("False", "WaitingForTrainingJob"),
                              "Reconciling": ("True", "WaitingForTrainingJob"), "Stalled": ("False", "Pending")}


def test_running_job_mirrors_the_trainers_progress() -> None:
    progress = {"phase": "Running", "step": 40, "totalSteps": 200, "epoch": 0.2, "loss": 3.25, "evalLoss": None,
                "tokensPerSecond": 1234.5, "percent": 20.0, "etaSeconds": 61.7, "updated": 1.0}
    s = status.compute({}, _obs(job=_job(active=1, startTime=T0), pods=[_pod(phase="Running")], progress=progress), T1)
    assert s["phase"] == "Running" and s["startTime"] == T0 and s["attempts"] == 1
    assert s["progress"] == {"step": 40, "totalSteps": 200, "epoch": 0.2, "loss": 3.25, "tokensPerSecond": 1234.5,
                             "percent": 20.0, "etaSeconds": 62}
    assert _conditions(s)["Reconciling"] == ("True", "Running")


def test_same_observation_gives_the_same_status() -> None:
    obs = _obs(job=_job(active=1), pods=[_pod(phase="Running")], progress={"step": 3})
    first = status.compute({}, obs, T0)
    assert status.compute(first, obs, T1) == first
    assert status.transitions(first, first) == []


def test_success_publishes_the_artifact_and_keeps_transition_times() -> None:
    running = status.compute({}, _obs(job=_job(active=1, startTime=T0), pods=[_pod(phase="Running")]), T0)
    progress = {"phase": "Succeeded", "step": 200, "totalSteps": 200,
                "artifact": {"uri": "artifact://team-a/tiny@4", "version": 4, "digest": "sha256:ab",
                             "metrics": {"evalLoss": 1.5, "testPerplexity": 4.4, "bogus": "x"}}}
    job = _job(succeeded=1, startTime=T0, completionTime=T1,
               conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": T1}])
    done = status.compute(running, _obs(job=job, pods=[_pod(phase="Succeeded")], progress=progress), T1)
    assert done["phase"] == "Succeeded" and done["completionTime"] == T1
    assert done["artifact"] == {"uri": "artifact://team-a/tiny@4", "version": 4, "digest": "sha256:ab",
                                "metrics": {"evalLoss": 1.5, "testPerplexity": 4.4}}
    assert done["progress"]["percent"] == 100.0 and done["progress"]["etaSeconds"] == 0
    assert _conditions(done) == {"Ready": ("True", "ArtifactPublished"), "Reconciling": ("False", "Succeeded"),
                                 "Stalled": ("False", "Succeeded")}
    stalled = find(done["conditions"], "Stalled")
    assert stalled is not None and stalled["lastTransitionTime"] == T0  # False before and after
    events = status.transitions(running, done)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Succeeded")]
    assert "artifact://team-a/tiny@4" in events[0].message


def test_model_left_on_a_claim_is_reported_as_a_pvc_uri() -> None:
    assert status.artifact_uri("/mnt/kubelm/volumes/ckpt/kubelm/ns/j/uid-1/model") == \
        "pvc://ckpt/kubelm/ns/j/uid-1/model"
    assert status.artifact_uri("/var/lib/kubelm/job/model") == "/var/lib/kubelm/job/model"


def test_failure_shows_the_pods_reason_and_the_trainers_last_words() -> None:
    pod = _pod(phase="Failed", containerStatuses=[{"name": "train", "state": {"terminated": {
        "reason": "OOMKilled", "exitCode": 137, "message": "step 10\nstep 20\nallocating 4 GiB"}}}])
    job = _job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                      "message": "Job has reached the specified backoff limit",
                                      "lastTransitionTime": T1}])
    s = status.compute({"phase": "Running"}, _obs(job=job, pods=[pod], progress={
        "phase": "Failed", "message": "RuntimeError: out of memory"}), T1)
    assert s["phase"] == "Failed" and s["completionTime"] == T1 and s["attempts"] == 1
    message = find(s["conditions"], "Stalled")["message"]  # type: ignore[index]
    assert message == ("BackoffLimitExceeded: Job has reached the specified backoff limit; pod j-train-0-abcde: "
                       "OOMKilled (exit code 137): step 10 | step 20 | allocating 4 GiB; "
                       "trainer: RuntimeError: out of memory")
    assert [(e.type, e.reason) for e in status.transitions({"phase": "Running"}, s)] == [("Warning", "Failed")]


def test_an_unschedulable_pod_stalls_the_job() -> None:
    pod = _pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                             "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}])
    s = status.compute({}, _obs(job=_job(active=1), pods=[pod]), T0)
    assert s["phase"] == "Pending" and _conditions(s)["Stalled"] == ("True", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in find(s["conditions"], "Stalled")["message"]  # type: ignore[index]


def test_image_pull_back_off_stalls_and_creating_does_not() -> None:
    def waiting(reason: str) -> ObservedPod:
        return _pod(phase="Pending", containerStatuses=[{"name": "train", "state": {"waiting": {
            "reason": reason, "message": "pull access denied"}}}])
    assert _conditions(status.compute({}, _obs(job=_job(active=1), pods=[waiting("ImagePullBackOff")]), T0))[
        "Stalled"] == ("True", "ImagePullBackOff")
    assert _conditions(status.compute({}, _obs(job=_job(active=1), pods=[waiting("ContainerCreating")]), T0))[
        "Reconciling"] == ("True", "WaitingForPods")


def test_a_job_whose_workers_finished_stays_running_until_it_is_complete() -> None:
    finished = _pod(phase="Succeeded")
    s = status.compute({}, _obs(job=_job(succeeded=1, startTime=T0), pods=[finished]), T1)
    assert s["phase"] == "Running" and _conditions(s)["Reconciling"] == ("True", "Finishing")
    # The pod has finished before the Job counts it.
    assert status.compute({}, _obs(job=_job(active=1, startTime=T0), pods=[finished]), T1)["phase"] == "Running"
    complete = _job(succeeded=1, startTime=T0, conditions=[{"type": "Complete", "status": "True"}])
    assert status.compute(s, _obs(job=complete, pods=[finished]), T1)["phase"] == "Succeeded"


def test_suspended_and_resumed() -> None:
    s = status.compute({}, _obs(suspend=True, job=_job(suspend=True)), T0)
    assert s["phase"] == "Suspended"
    assert _conditions(s) == {"Ready": ("False", "Suspended"), "Reconciling": ("False", "Suspended"),
                              "Stalled": ("False", "Suspended")}
    assert "checkpoints are kept" in s["conditions"][0]["message"]
    ephemeral = status.compute({}, _obs(suspend=True, job=_job(suspend=True), checkpoints_kept=False), T0)
    assert "starts over when resumed" in ephemeral["conditions"][0]["message"]
    assert "checkpoints are kept" not in ephemeral["conditions"][0]["message"]
    resumed = status.compute(s, _obs(job=_job(active=1), pods=[_pod(phase="Running")]), T1)
    assert resumed["phase"] == "Running"
    assert [e.reason for e in status.transitions(s, resumed)] == ["Running"]


def test_a_retry_after_a_failed_pod_is_counted() -> None:
    failed = _pod("j-train-0-aaaaa", phase="Failed", containerStatuses=[{"name": "train", "state": {
        "terminated": {"reason": "Error", "exitCode": 1}}}])
    s = status.compute({}, _obs(job=_job(active=1, failed=1), pods=[failed, _pod("j-train-0-bbbbb", phase="Running")]),
                       T0)
    assert s["phase"] == "Running" and s["attempts"] == 2
    assert _conditions(s)["Reconciling"] == ("True", "Retrying")


def test_finished_job_whose_job_was_removed_keeps_its_record() -> None:
    old = {"phase": "Succeeded", "artifact": {"uri": "artifact://a@1"}, "conditions": [], "observedGeneration": 1}
    assert status.compute(old, _obs(generation=2), T1) == {**old, "observedGeneration": 2}


STALE = {"phase": "Succeeded", "step": 200, "totalSteps": 200, "loss": 0.5, "percent": 100.0,
         "artifact": {"uri": "artifact://team-a/tiny@4", "version": 4}, "incarnation": "uid-old"}
"""What an earlier TrainingJob of the same name left in its progress key."""


def test_progress_of_another_incarnation_is_ignored() -> None:
    assert status.own_progress(STALE, "uid-new") is None
    assert status.own_progress(STALE, "uid-old") is STALE
    unstamped = {k: v for k, v in STALE.items() if k != "incarnation"}
    assert status.own_progress(unstamped, "uid-new") is unstamped  # a trainer that predates the stamp
    assert status.own_progress(STALE, None) is STALE
    assert status.own_progress(None, "uid-new") is None


def test_a_job_created_again_does_not_take_its_predecessors_progress_or_artifact() -> None:
    running = status.compute({}, _obs(job=_job(active=1, startTime=T0), pods=[_pod(phase="Running")],
                                      progress=STALE, uid="uid-new"), T0)
    assert running["phase"] == "Running" and "progress" not in running and "artifact" not in running
    complete = _job(succeeded=1, startTime=T0, completionTime=T1,
                    conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": T1}])
    done = status.compute(running, _obs(job=complete, pods=[_pod(phase="Succeeded")], progress=STALE,
                                        uid="uid-new"), T1)
    assert "artifact" not in done and _conditions(done)["Ready"] == ("False", "ArtifactUnknown")
    own = status.compute(running, _obs(job=complete, pods=[_pod(phase="Succeeded")],
                                       progress={**STALE, "incarnation": "uid-new"}, uid="uid-new"), T1)
    assert own["artifact"] == {"uri": "artifact://team-a/tiny@4", "version": 4}
    assert _conditions(own)["Ready"] == ("True", "ArtifactPublished")


def test_a_failure_does_not_quote_another_incarnations_trainer() -> None:
    job = _job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                      "message": "Job has reached the specified backoff limit"}])
    progress = {"phase": "Failed", "message": "RuntimeError: the old run's error", "incarnation": "uid-old"}
    s = status.compute({}, _obs(job=job, progress=progress, uid="uid-new"), T1)
    assert find(s["conditions"], "Stalled")["message"] == \
        "BackoffLimitExceeded: Job has reached the specified backoff limit"  # type: ignore[index]
