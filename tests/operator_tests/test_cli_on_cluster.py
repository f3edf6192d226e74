"""The `kubelm` command against known cluster states: the operator on the real control plane drives each
TrainingJob and LanguageModel into one state (the kubelet's part played through the pod status API, as in
the operator's tests), and the installed `kubelm` program reads them as a user would. The same live
objects are checked with the Argo CD health script and with kstatus (Flux, `kubectl wait`)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml
from kubernetes import client

from gitops_support import argocd_health, kstatus
from kubelm_contract import queues
from kubelm_contract.queues import QueueSpec
from kubelm_devcluster.operator import service_account_kubeconfig
from kubelm_devcluster.probes import http_get
from kubelm_runtime.progress import ProgressReporter
from support import ClusterEnv, eventually

from .conftest import GROUP, VERSION, Api, OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.services]

KUBELM = str(Path(sys.executable).parent / "kubelm")
SMALL = {"baseModel": {"hub": {"id": "openai-community/gpt2"}}, "dataset": {"train": "/data/train.txt"},
         "resources": {"cpu": "10m", "memory": "32Mi"}, "backoffLimit": 0}
SERVE = {"model": {"hub": {"id": "openai-community/gpt2"}}, "resources": {"cpu": "10m", "memory": "32Mi"}}
ARTIFACT = {"uri": "artifact://{ns}/done@1", "version": 1, "digest": "sha256:" + "ab" * 32}


def kubelm(kubeconfig: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": kubeconfig, "COLUMNS": "220"}
    return subprocess.run([KUBELM, *args], capture_output=True, text=True, timeout=120, env=env)


def _status(api: Api, plural: str, namespace: str, name: str) -> dict[str, Any]:
    return dict(api.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name).get("status") or {})


def _reason(status: dict[str, Any], type_: str = "Ready") -> str | None:
    return next((c.get("reason") for c in status.get("conditions", []) if c["type"] == type_), None)


def _create(api: Api, plural: str, kind: str, namespace: str, name: str, spec: dict[str, Any]) -> None:
    api.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec})


def _wait(api: Api, plural: str, namespace: str, name: str, phase: str, reason: str) -> None:
    def there() -> bool:
        status = _status(api, plural, namespace, name)
        return status.get("phase") == phase and reason in (_reason(status), _reason(status, "Stalled"))
    eventually(there, timeout=120, what=f"{name}: {phase} with {reason}")


def _trainer_pod(api: Api, namespace: str, name: str) -> str:
    def pods() -> list[Any]:
        return api.pods(namespace, f"{name}-train")
    eventually(lambda: bool(pods()), timeout=120, what=f"the trainer pod of {name}")
    return str(pods()[0].metadata.name)


@pytest.fixture(scope="module")
def states(operator: OperatorProcess, api_client: client.ApiClient, custom: client.CustomObjectsApi,
           cluster: ClusterEnv) -> Iterator[str]:
    """One namespace holding an object in each state the command must tell apart."""
    api = Api(api_client, custom)
    ns = f"cli-{uuid.uuid4().hex[:6]}"
    api.core.create_namespace({"metadata": {"name": ns}})
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    queues.declare_model_queues(connection.channel(), ns, "clash", QueueSpec(max_length=5))
    connection.close()

    tj = ("trainingjobs", "TrainingJob")
    lm = ("languagemodels", "LanguageModel")
    _create(api, *tj, ns, "gpu-hungry", {**SMALL, "resources": {"cpu": "10m", "memory": "32Mi", "gpus": 4}})
    _create(api, *tj, ns, "needs-data", {**SMALL, "dataset": {"train": "pvc://corpus/train.txt"}})
    _create(api, *tj, ns, "paused", {**SMALL, "suspend": True})
    for name in ("broken", "trainer", "done"):
        _create(api, *tj, ns, name, SMALL)
    _create(api, *tj, ns, "waiting", {**SMALL, "baseModel": {"trainingJobRef": {"name": "trainer"}}})
    _create(api, *lm, ns, "idle", {**SERVE, "gateway": {"enabled": False},  # Ready without a gateway pod to run
                                   "autoscaling": {"minReplicas": 0, "scaleDownStabilizationSeconds": 0}})
    _create(api, *lm, ns, "gpu-model", {**SERVE, "resources": {"cpu": "10m", "memory": "32Mi", "gpus": 1},
                                        "autoscaling": {"minReplicas": 1, "maxReplicas": 1}})
    _create(api, *lm, ns, "clash", {**SERVE, "queue": {"maxLength": 10}})
    _create(api, *lm, ns, "from-missing", {**SERVE, "model": {"trainingJobRef": {"name": "gone"}}})

    api.finish_pod(ns, _trainer_pod(api, ns, "broken"), exit_code=1, reason="Error", message="ValueError: bad data")
    trainer = _trainer_pod(api, ns, "trainer")
    api.run_pod(ns, trainer)
    assert ProgressReporter(cluster.redis_url, f"{ns}/trainer").report(
        {"phase": "Running", "step": 5, "totalSteps": 10, "epoch": 0.5, "loss": 2.5, "percent": 50.0,
         "etaSeconds": 95, "worldSize": 1}, force=True)
    done = _trainer_pod(api, ns, "done")
    artifact = {**ARTIFACT, "uri": ARTIFACT["uri"].format(ns=ns)}
    assert ProgressReporter(cluster.redis_url, f"{ns}/done").report(
        {"phase": "Succeeded", "step": 10, "totalSteps": 10, "percent": 100.0, "etaSeconds": 0, "loss": 1.5,
         "artifact": artifact}, force=True)
    api.finish_pod(ns, done, exit_code=0, reason="Completed")

    for plural, name, phase, reason in [
            ("trainingjobs", "gpu-hungry", "Pending", "Unschedulable"),
            ("trainingjobs", "needs-data", "Pending", "ClaimNotFound"),
            ("trainingjobs", "paused", "Suspended", "Suspended"),
            ("trainingjobs", "broken", "Failed", "BackoffLimitExceeded"),
            ("trainingjobs", "waiting", "Pending", "WaitingForTrainingJob"),
            ("trainingjobs", "done", "Succeeded", "ArtifactPublished"),
            ("languagemodels", "idle", "Ready", "ScaledToZero"),
            ("languagemodels", "gpu-model", "Degraded", "Unschedulable"),
            ("languagemodels", "clash", "Degraded", "QueueArgumentConflict"),
            ("languagemodels", "from-missing", "Failed", "TrainingJobNotFound")]:
        _wait(api, plural, ns, name, phase, reason)
    eventually(lambda: (_status(api, "trainingjobs", ns, "trainer").get("progress") or {}).get("step") == 5,
               timeout=120, what="the trainer's progress mirrored")
    yield ns
    for pod in api.core.list_namespaced_pod(ns).items:
        api.core.delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)
    api.core.delete_namespace(ns)


# (target, exit code, words the sentence must hold)
EXPLAINED = [
    ("tj/gpu-hungry", 1, ["No node has the 4 GPU(s) per worker", "nvidia.com/gpu", "NVIDIA device plugin"]),
    ("tj/needs-data", 1, ["PersistentVolumeClaim it needs is missing", "'corpus'"]),
    ("tj/paused", 1, ["suspended", "set it to false"]),
    ("tj/broken", 1, ["Training failed with its last reported error", "ValueError: bad data"]),
    ("tj/waiting", 1, ["Waiting for a TrainingJob to succeed", "'trainer'"]),
    ("tj/trainer", 1, ["step 5/10", "1m35s left"]),
    ("tj/done", 0, ["Ready: trained", "artifact://", "(version 1)"]),
    ("lm/idle", 0, ["Ready: no requests wait"]),
    ("lm/gpu-model", 1, ["No node has the 1 GPU(s) per replica", "nvidia.com/gpu"]),
    ("lm/clash", 1, ["already exists with other arguments", "spec.queue.maxLength"]),
    ("lm/from-missing", 1, ["waits for a TrainingJob that does not exist", "'gone'"]),
]


@pytest.mark.parametrize(("target", "code", "words"), EXPLAINED, ids=[t for t, _, _ in EXPLAINED])
def test_explain_names_each_state_and_what_to_do(states: str, cluster: ClusterEnv, target: str, code: int,
                                                 words: list[str]) -> None:
    result = kubelm(cluster.kubeconfig, "explain", target, "-n", states)
    assert result.returncode == code, result.stderr
    assert result.stdout.count("\n") == 1, "one sentence"
    for word in words:
        assert word in result.stdout, result.stdout


def test_status_shows_both_kinds_in_a_table_and_as_json(states: str, cluster: ClusterEnv) -> None:
    table = kubelm(cluster.kubeconfig, "status", "-n", states)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    row = next(line for line in lines if line.split()[:1] == ["trainer"])
    assert row.split()[1] == "Running" and "5/10" in row and "2.5" in row and "1m35s" in row
    assert next(line for line in lines if line.split()[:1] == ["idle"]).split()[1:3] == ["Ready", "0/0"]
    assert "NAMESPACE" not in table.stdout

    found = json.loads(kubelm(cluster.kubeconfig, "status", "-n", states, "-o", "json").stdout)
    jobs = {j["name"]: j for j in found["trainingJobs"]}
    models = {m["name"]: m for m in found["languageModels"]}
    assert set(jobs) == {"gpu-hungry", "needs-data", "paused", "broken", "trainer", "done", "waiting"}
    assert set(models) == {"idle", "gpu-model", "clash", "from-missing"}
    assert (jobs["trainer"]["step"], jobs["trainer"]["totalSteps"], jobs["trainer"]["loss"],
            jobs["trainer"]["etaSeconds"]) == (5, 10, 2.5, 95)
    assert jobs["done"]["artifact"] == f"artifact://{states}/done@1 (v1)" and jobs["done"]["ready"] is True
    assert (models["clash"]["phase"], models["clash"]["reason"]) == ("Degraded", "QueueArgumentConflict")
    assert models["idle"]["queueDepth"] == 0 and models["idle"]["ready"] is True

    everywhere = yaml.safe_load(kubelm(cluster.kubeconfig, "status", "-A", "-o", "yaml").stdout)
    assert {(m["namespace"], m["name"]) for m in everywhere["languageModels"]} >= {(states, "idle")}
    assert "NAMESPACE" in kubelm(cluster.kubeconfig, "status", "-A").stdout


def test_describe_shows_conditions_and_the_objects_events(states: str, cluster: ClusterEnv) -> None:
    def described() -> str:
        result = kubelm(cluster.kubeconfig, "describe", "tj/broken", "-n", states)
        assert result.returncode == 0, result.stderr
        return result.stdout
    # The Event for the transition to Failed is posted just after the status write.
    eventually(lambda: "Warning" in described().split("Events")[-1], timeout=60, what="the Failed Event listed")
    text = described()
    assert "BackoffLimitExceeded" in text and "ValueError: bad data" in text
    sections = json.loads(kubelm(cluster.kubeconfig, "describe", "lm/idle", "-n", states, "-o", "json").stdout)
    assert {c["type"]: c["status"] for c in sections["Conditions"]}["Ready"] == "True"
    # Created at its minReplicas of 0 (not the API's default of 1): the autoscaler had nothing to decide.
    assert sections["Scaling history"] == []
    assert sections["Revisions"] == []


ARGO_AND_KSTATUS = {  # name -> (Argo CD health, kstatus)
    "gpu-hungry": ("Degraded", "Failed"), "needs-data": ("Degraded", "Failed"), "broken": ("Degraded", "Failed"),
    "paused": ("Suspended", "InProgress"), "waiting": ("Progressing", "InProgress"),
    "trainer": ("Progressing", "InProgress"), "done": ("Healthy", "Current"), "idle": ("Healthy", "Current"),
    "gpu-model": ("Degraded", "Failed"), "clash": ("Degraded", "Failed"), "from-missing": ("Degraded", "Failed"),
}


def test_argocd_health_and_kstatus_read_the_live_objects_alike(states: str, api_client: client.ApiClient,
                                                               custom: client.CustomObjectsApi) -> None:
    objects = [dict(o, apiVersion=f"{GROUP}/{VERSION}", kind=kind)
               for plural, kind in (("trainingjobs", "TrainingJob"), ("languagemodels", "LanguageModel"))
               for o in custom.list_namespaced_custom_object(GROUP, VERSION, states, plural)["items"]]
    computed = kstatus(objects)
    seen = {o["metadata"]["name"]: (argocd_health(o)["status"], k["status"])
            for o, k in zip(objects, computed, strict=True)}
    assert seen == ARGO_AND_KSTATUS


def test_any_context_and_its_namespace(states: str, cluster: ClusterEnv, tmp_path: Path) -> None:
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    first = config["contexts"][0]
    config["contexts"].append({"name": "team", "context": {**first["context"], "namespace": states}})
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    found = json.loads(kubelm(str(path), "--context", "team", "status", "-o", "json").stdout)
    assert {m["namespace"] for m in found["languageModels"]} == {states}
    wrong = kubelm(str(path), "--context", "nope", "status")
    assert wrong.returncode == 3 and wrong.stderr.startswith("error: kubeconfig: ") and "nope" in wrong.stderr


class Terminal:
    """`kubelm` drawing on a pseudo-terminal, read as a terminal emulator reads it: for as long as the test
    says, since a process whose terminal takes no more output blocks in its next write."""

    def __init__(self, kubeconfig: str, *args: str):
        self.leader, follower = pty.openpty()
        self.follower_path = os.ttyname(follower)
        self.process = subprocess.Popen([KUBELM, *args], stdin=follower, stdout=follower, stderr=follower,
                                        env={**os.environ, "KUBECONFIG": kubeconfig, "TERM": "xterm",
                                             "COLUMNS": "200"})
        os.close(follower)
        self.seen = b""

    def read(self) -> bool:
        """Whether there was more to read."""
        if not select.select([self.leader], [], [], 0.2)[0]:
            return False
        try:
            more = os.read(self.leader, 65536)
        except OSError:  # EIO: every follower is closed, the process has ended
            return False
        self.seen += more
        return bool(more)

    def read_until(self, done: Callable[[bytes], bool], what: str) -> None:
        def there() -> bool:
            self.read()
            return done(self.seen)
        eventually(there, timeout=60, interval=0, what=what)

    def read_until_exit(self) -> int:
        self.read_until(lambda _: self.process.poll() is not None, what="kubelm ended")
        while self.read():
            pass
        return self.process.returncode

    def stop_output(self) -> None:
        """Take no more output, as a terminal does whose reader stopped (or that got an XOFF): from then on
        the process blocks in its next write, whatever room the terminal's buffers have left."""
        own = os.open(self.follower_path, os.O_RDWR | os.O_NOCTTY)
        try:
            termios.tcflow(own, termios.TCOOFF)
        finally:
            os.close(own)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.leader)


@pytest.fixture
def terminal(cluster: ClusterEnv) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_(*args: str) -> Terminal:
        opened.append(Terminal(cluster.kubeconfig, *args))
        return opened[-1]
    yield open_
    for t in opened:
        t.close()


SHOW_CURSOR = b"\x1b[?25h"


def test_status_watch_redraws_in_a_terminal_until_interrupted(states: str, terminal: Callable[..., Terminal]) -> None:
    t = terminal("status", "-n", states, "--watch", "--interval", "0.5")
    t.read_until(lambda seen: seen.count(b"TrainingJobs") >= 3, what="the screen drawn three times")
    assert b"trainer" in t.seen and b"5/10" in t.seen
    drawn = len(t.seen)
    t.process.send_signal(signal.SIGINT)
    assert t.read_until_exit() == 0
    # The last screen stays, and the cursor that the redrawing hid is shown again.
    assert SHOW_CURSOR in t.seen[drawn:]


def test_status_watch_ends_on_ctrl_c_when_its_terminal_takes_no_more_output(
        states: str, terminal: Callable[..., Terminal]) -> None:
    """A terminal whose reader stopped (a stalled ssh link): whether Ctrl-C finds the command between
    redraws or blocked in one, leaving takes writing the last screen, which never gets written. The command
    ends anyway, with the exit code of an interrupted program."""
    t = terminal("status", "-n", states, "--watch", "--interval", "0.5")
    t.read_until(lambda seen: seen.count(b"TrainingJobs") >= 2, what="the screen drawn, then redrawn")
    t.stop_output()
    t.process.send_signal(signal.SIGINT)
    assert t.process.wait(timeout=60) == 130


def test_errors_are_one_line_with_their_exit_code(states: str, cluster: ClusterEnv, tmp_path: Path) -> None:
    missing = kubelm(cluster.kubeconfig, "explain", "tj/nope", "-n", states)
    assert (missing.returncode, missing.stderr.strip()) == (6, f"error: TrainingJob {states}/nope: not found")
    assert kubelm(cluster.kubeconfig, "explain", "pod/x").returncode == 2

    def kubectl(*args: str, **kw: Any) -> str:
        return cluster.kubectl(*args, **kw).stdout
    kubectl("create", "serviceaccount", "nobody", "-n", states)
    nobody = service_account_kubeconfig(kubectl, Path(cluster.kubeconfig), tmp_path / "nobody", account="nobody",
                                        namespace=states)
    denied = kubelm(str(nobody), "status", "-n", states)
    assert denied.returncode == 4 and denied.stderr.startswith("error: access denied to languagemodels"), denied.stderr
    assert denied.stderr.count("\n") == 1 and "Traceback" not in denied.stderr


def _host_address() -> str | None:
    """An IPv4 address of this machine other than loopback, which the API server will not proxy to."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in shown.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


def http_ok(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def test_generate_passes_the_gateways_api_key_through_the_api_servers_proxy(
        operator: OperatorProcess, api_client: client.ApiClient, custom: client.CustomObjectsApi,
        cluster: ClusterEnv, tmp_path: Path) -> None:
    """The API server keeps a caller's Authorization header for itself: `kubelm generate` reads the key from
    the Secret the model names and sends it in an `api-key` header, which the proxy passes on. A real gateway
    process on this machine stands in for the gateway pod (a pod object marked ready at this machine's
    address), so the request goes kubelm -> API server proxy -> gateway -> RabbitMQ. No worker runs: a request
    the gateway let in times out (504) where a refused one gets its 401."""
    address = _host_address()
    if address is None:
        pytest.skip("this machine has no address other than loopback for the API server to proxy to")
    api = Api(api_client, custom)
    ns = f"cli-key-{uuid.uuid4().hex[:6]}"
    api.core.create_namespace({"metadata": {"name": ns}})
    gateway: subprocess.Popen[bytes] | None = None
    try:
        api.core.create_namespaced_secret(ns, {"metadata": {"name": "clients"}, "stringData": {"token": "s3cret"}})
        _create(api, "languagemodels", "LanguageModel", ns, "guarded",
                {**SERVE, "gateway": {"authSecretRef": {"name": "clients"}}, "autoscaling": {"minReplicas": 0}})

        def registered() -> bool:
            conditions = {c["type"]: c["status"]
                          for c in _status(api, "languagemodels", ns, "guarded").get("conditions", [])}
            return conditions.get("QueueReady") == conditions.get("CacheReady") == "True"
        eventually(registered, timeout=120, what="the model's queue declared and registry entry written")
        endpoint = _status(api, "languagemodels", ns, "guarded")["endpoint"]
        service = api.core.read_namespaced_service(endpoint.split("//")[1].split(".")[0], ns)

        port = _free_port(address)
        key_file = tmp_path / "key"
        key_file.write_text("s3cret\n")
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump({"namespace": ns, "models": ["guarded"], "host": address, "port": port,
                                          "authTokenFile": str(key_file), "requestTimeoutSeconds": 1}))
        with open(tmp_path / "gateway.log", "wb") as log:
            gateway = subprocess.Popen([sys.executable, "-m", "kubelm_runtime", "gateway", "--config", str(config)],
                                       stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "KUBELM_AMQP_URL": cluster.amqp_url,
                                            "KUBELM_REDIS_URL": cluster.redis_url})
        eventually(lambda: http_ok(f"http://{address}:{port}/readyz"), timeout=90, interval=0.1, what="gateway ready")

        api.core.create_namespaced_pod(ns, {
            "metadata": {"name": "stand-in", "labels": service.spec.selector},
            "spec": {"containers": [{"name": "gateway", "image": "kubelm/runtime:test",
                                     "ports": [{"name": "http", "containerPort": port}]}]}})
        api.core.patch_namespaced_pod_status("stand-in", ns, {"status": {
            "phase": "Running", "podIP": address, "podIPs": [{"ip": address}],
            "conditions": [{"type": "Ready", "status": "True"}]}})

        def routed() -> bool:
            endpoints = api.core.read_namespaced_endpoints(service.metadata.name, ns)
            return any(a.ip == address for s in endpoints.subsets or [] for a in s.addresses or [])
        eventually(routed, timeout=60, what="the stand-in pod behind the gateway Service")

        ask = ("generate", "guarded", "hello", "-n", ns, "--max-tokens", "2", "--temperature", "0")
        let_in = kubelm(cluster.kubeconfig, *ask)
        assert let_in.returncode == 7 and "no reply within 1s" in let_in.stderr, let_in.stderr
        refused = kubelm(cluster.kubeconfig, *ask, "--api-key", "wrong")
        assert refused.returncode == 4 and "missing or wrong API key" in refused.stderr, refused.stderr
    finally:
        if gateway is not None:
            gateway.kill()
            gateway.wait()
        for pod in api.core.list_namespaced_pod(ns).items:
            api.core.delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)
        api.core.delete_namespace(ns)
