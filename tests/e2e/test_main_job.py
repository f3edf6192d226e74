"""The main job end to end on the dev cluster's real node, the way a user runs it: kubelm installed from
its manifests (the operator as a Pod from its image, on the shipped RBAC), the dev overlay's Redis
and RabbitMQ, a TrainingJob that trains on the sample corpus, a LanguageModel serving its artifact,
prompts answered through the gateway Service, and deletion cleaning up what each object made.

Every wait is for an event (a condition, a rollout, an answer), with timeouts sized for two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from kubelm_contract import env as contract_env
from kubelm_contract import keys, queues
from kubelm_devcluster import mainjob
from kubelm_devcluster.operator import OPERATOR_NAMESPACE
from node_support import RealNode, kubectl_process, port_forward
from support import eventually

pytestmark = [pytest.mark.slow]

NAMESPACE = "default"
RUNTIME_CLI = str(Path(sys.executable).parent / "kubelm-runtime")
KUBELM = str(Path(sys.executable).parent / "kubelm")


def kubelm(node: RealNode, *args: str, **popen: Any) -> subprocess.Popen[str]:
    """The `kubelm` command as a user runs it, with the cluster's kubeconfig."""
    return subprocess.Popen([KUBELM, *args], env={**os.environ, "KUBECONFIG": node.env.kubeconfig, "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def kubelm_run(node: RealNode, *args: str) -> tuple[int, str, str]:
    process = kubelm(node, *args)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def kubectl_json(node: RealNode, *args: str) -> dict[str, Any]:
    return json.loads(node.env.kubectl(*args, "-o", "json").stdout)


def apply(node: RealNode, *objects: dict[str, Any]) -> None:
    node.env.kubectl("apply", "--server-side", "--field-manager=kubelm-tests", "-f", "-",
                     input=yaml.safe_dump_all(objects))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def redis_cli(node: RealNode, *args: str) -> str:
    return node.env.kubectl("exec", "-n", OPERATOR_NAMESPACE, "redis-0", "--", "redis-cli", *args).stdout.strip()


def rabbitmq_queue(node: RealNode, name: str) -> int:
    """The management API's status code for a queue (200 or 404), through a port-forward."""
    with port_forward(node, OPERATOR_NAMESPACE, "service/rabbitmq", 15672) as url:
        request = urllib.request.Request(f"{url}/api/queues/%2F/{name}",
                                         headers={"Authorization": "Basic a3ViZWxtOmt1YmVsbQ=="})  # kubelm:kubelm
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)


@pytest.fixture(scope="module")
def node(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> RealNode:
    mainjob.install(lambda *args, **kw: real_node.env.kubectl(*args, **kw).stdout)
    # The operator mirrors training progress into status every 10 s by default, about as long as the
    # whole tiny run here: a user's setting (docs/operator.md) makes it every second, so that progress
    # is seen while the job runs on any machine.
    real_node.env.kubectl("set", "env", "-n", OPERATOR_NAMESPACE, "deployment/kubelm-operator",
                          f"{contract_env.PROGRESS_INTERVAL}=1")
    real_node.env.kubectl("rollout", "status", "-n", OPERATOR_NAMESPACE, "deployment/kubelm-operator",
                          "--timeout=300s")
    data = mainjob.prepare_data(tmp_path_factory.mktemp("demo-data"), RUNTIME_CLI)
    apply(real_node, *mainjob.data_volume(data, NAMESPACE))
    return real_node


def test_the_operator_runs_as_a_pod_of_its_image_on_the_shipped_service_account(node: RealNode) -> None:
    pods = kubectl_json(node, "get", "pods", "-n", OPERATOR_NAMESPACE,
                        "-l", "app.kubernetes.io/name=kubelm-operator")["items"]
    assert len(pods) == 1
    pod = pods[0]
    assert condition(pod, "Ready")["status"] == "True"
    assert pod["spec"]["serviceAccountName"] == "kubelm-operator"
    assert pod["spec"]["containers"][0]["image"] == "kubelm/operator:0.1.0"
    assert pod["spec"]["nodeName"] == "kubelm-local"


@pytest.fixture(scope="module")
def trained(node: RealNode) -> dict[str, Any]:
    """The TrainingJob applied and watched to the end; what its status said on the way."""
    seen: list[dict[str, Any]] = []
    watch = kubectl_process(node, "get", "trainingjobs", "-n", NAMESPACE, "--watch", "--output-watch-events",
                            "-o", "json")

    def collect() -> None:
        decoder = json.JSONDecoder()
        buffer = ""
        assert watch.stdout
        for line in watch.stdout:
            buffer += line
            try:
                event, _ = decoder.raw_decode(buffer)
            except ValueError:
                continue
            buffer = ""
            if event["object"]["metadata"]["name"] == mainjob.MODEL:
                seen.append(event["object"].get("status", {}))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    apply(node, mainjob.training_job(NAMESPACE, steps=300))
    # Started with the job, as a user would: it waits for the trainer, follows it, and ends with it.
    logs = kubelm(node, "logs", f"tj/{mainjob.MODEL}", "-n", NAMESPACE)

    def finished() -> bool:
        status = kubectl_json(node, "get", "trainingjob", "-n", NAMESPACE, mainjob.MODEL).get("status", {})
        return status.get("phase") in ("Succeeded", "Failed")

    try:
        eventually(finished, 900, 1, "the TrainingJob finished")
    finally:
        watch.kill()
        reader.join(10)
    final = kubectl_json(node, "get", "trainingjob", "-n", NAMESPACE, mainjob.MODEL)
    try:
        logged = logs.communicate(timeout=120)
    finally:
        logs.kill()
    return {"final": final, "seen": seen, "logs": (logs.returncode, *logged)}


def test_kubelm_logs_followed_the_trainer_to_its_end(trained: dict[str, Any]) -> None:
    code, out, err = trained["logs"]
    assert code == 0, err
    lines = out.splitlines()
    assert any("step " in line and "/300 " in line for line in lines), out[-2000:]
    assert any("published artifact://" in line for line in lines), out[-2000:]
    assert "Ready: trained; the model is published as" in err


def test_the_training_job_runs_shows_progress_and_publishes_an_artifact(trained: dict[str, Any]) -> None:
    status = trained["final"]["status"]
    assert status["phase"] == "Succeeded", status
    assert condition(trained["final"], "Ready")["reason"] == "ArtifactPublished"
    assert status["artifact"]["uri"] == f"artifact://{NAMESPACE}/{mainjob.MODEL}@1"
    assert status["artifact"]["digest"].startswith("sha256:")
    running = [s for s in trained["seen"] if s.get("phase") == "Running"]
    assert running, [s.get("phase") for s in trained["seen"]]
    # Progress was reported while it ran, not only at the end.
    assert any(0 < float(s.get("progress", {}).get("percent", 0)) < 100 for s in running), running


@pytest.fixture(scope="module")
def served(node: RealNode, trained: dict[str, Any]) -> Iterator[dict[str, Any]]:
    apply(node, mainjob.language_model(NAMESPACE))
    node.env.kubectl("wait", "-n", NAMESPACE, f"languagemodel/{mainjob.MODEL}", "--for=condition=Ready",
                     "--timeout=600s")
    node.env.kubectl("rollout", "status", "-n", NAMESPACE, f"deployment/{mainjob.MODEL}-gateway", "--timeout=300s")
    model = kubectl_json(node, "get", "languagemodel", "-n", NAMESPACE, mainjob.MODEL)
    with port_forward(node, NAMESPACE, f"service/{mainjob.MODEL}-gateway", 8080) as url:
        yield {"model": model, "url": url, "artifact": trained["final"]["status"]["artifact"]}


def test_the_language_model_is_ready_with_the_artifacts_digest(served: dict[str, Any]) -> None:
    status = served["model"]["status"]
    assert status["phase"] == "Ready"
    assert status["model"]["source"] == served["artifact"]["uri"]
    assert status["model"]["digest"] == served["artifact"]["digest"]
    assert status["endpoint"] == f"http://{mainjob.MODEL}-gateway.{NAMESPACE}.svc:8080/v1"


def test_prompts_are_answered_through_the_gateway_service_by_the_official_client(served: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=120)
    assert mainjob.MODEL in [m.id for m in client.models.list().data]
    result = client.completions.create(model=mainjob.MODEL, prompt=["Once upon a time", "The fox"],
                                       max_tokens=12, temperature=0)
    assert len(result.choices) == 2 and all(c.text for c in result.choices)
    assert result.usage.completion_tokens > 0
    chat = client.chat.completions.create(model=mainjob.MODEL, messages=[{"role": "user", "content": "The fox"}],
                                          max_completion_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content


def test_kubelm_status_generate_and_explain_through_the_api_server_and_the_queue(
        node: RealNode, served: dict[str, Any]) -> None:
    code, out, err = kubelm_run(node, "status", "-n", NAMESPACE, "-o", "json")
    assert code == 0, err
    found = json.loads(out)
    model = next(m for m in found["languageModels"] if m["name"] == mainjob.MODEL)
    job = next(j for j in found["trainingJobs"] if j["name"] == mainjob.MODEL)
    assert (model["phase"], model["ready"], model["modelDigest"]) == ("Ready", True, served["artifact"]["digest"])
    assert (job["phase"], job["step"], job["totalSteps"]) == ("Succeeded", 300, 300)
    assert kubelm_run(node, "explain", f"lm/{mainjob.MODEL}", "-n", NAMESPACE)[0] == 0

    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=120)
    expected = client.completions.create(model=mainjob.MODEL, prompt="The little fox", max_tokens=10,
                                         temperature=0).choices[0].text
    ask = ("generate", mainjob.MODEL, "The little fox", "-n", NAMESPACE, "--max-tokens", "10", "--temperature", "0")
    # Through the gateway, reached through the API server's service proxy (no port-forward).
    code, out, err = kubelm_run(node, *ask)
    assert (code, out) == (0, expected + "\n"), err
    # Straight through the queue, as when no gateway runs.
    with port_forward(node, OPERATOR_NAMESPACE, "service/rabbitmq", 5672) as url:
        amqp = url.replace("http://", "amqp://kubelm:kubelm@") + "/%2F"
        code, out, err = kubelm_run(node, *ask, "--via", "queue", "--amqp-url", amqp, "-o", "json")
    assert code == 0, err
    assert json.loads(out)["choices"][0]["text"] == expected


def test_the_queue_and_the_registry_entry_exist(node: RealNode, served: dict[str, Any]) -> None:
    assert rabbitmq_queue(node, queues.request_queue(NAMESPACE, mainjob.MODEL)) == 200
    entry = json.loads(redis_cli(node, "HGET", keys.MODEL_REGISTRY, keys.model_id(NAMESPACE, mainjob.MODEL)))
    assert entry["digest"] == served["artifact"]["digest"]
    assert entry["queue"] == queues.request_queue(NAMESPACE, mainjob.MODEL)


def pods_of(node: RealNode, name: str) -> list[str]:
    pods = kubectl_json(node, "get", "pods", "-n", NAMESPACE, "-l", f"kubelm.io/languagemodel={name}")
    return [p["metadata"]["name"] for p in pods["items"]]


def _worker_pods(node: RealNode) -> list[dict[str, Any]]:
    pods = kubectl_json(node, "get", "pods", "-n", NAMESPACE, "-l",
                        f"kubelm.io/languagemodel={mainjob.MODEL},app.kubernetes.io/component=serving-worker")
    return [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]


def test_a_change_that_rolls_the_workers_is_ready_only_once_the_new_pods_serve(
        node: RealNode, served: dict[str, Any]) -> None:
    """Ready for the new generation means no pod of the older configuration answers any more."""
    node.env.kubectl("patch", "languagemodel", "-n", NAMESPACE, mainjob.MODEL, "--type=merge",
                     "-p", '{"spec":{"generation":{"temperature":0.9}}}')
    generation = kubectl_json(node, "get", "languagemodel", "-n", NAMESPACE, mainjob.MODEL)["metadata"]["generation"]

    def ready_for_this_generation() -> bool:
        model = kubectl_json(node, "get", "languagemodel", "-n", NAMESPACE, mainjob.MODEL)
        ready = condition(model, "Ready")
        return ready.get("status") == "True" and ready.get("observedGeneration") == generation
    eventually(ready_for_this_generation, 600, 0.5, "Ready for the new generation")
    template = kubectl_json(node, "get", "deployment", "-n", NAMESPACE, f"{mainjob.MODEL}-worker")["spec"]["template"]
    wanted = template["metadata"]["annotations"]["kubelm.io/config-digest"]
    serving = _worker_pods(node)
    assert serving and all(p["metadata"]["annotations"]["kubelm.io/config-digest"] == wanted for p in serving), \
        [(p["metadata"]["name"], p["metadata"]["annotations"]) for p in serving]
    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=120)
    assert client.completions.create(model=mainjob.MODEL, prompt="The fox", max_tokens=4).choices[0].text


def test_deleting_the_language_model_under_load_stops_its_pods_first_and_leaves_nothing(
        node: RealNode, served: dict[str, Any]) -> None:
    assert pods_of(node, mainjob.MODEL)
    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=30)
    stop = threading.Event()
    sent: list[bool] = []

    def load() -> None:
        while not stop.is_set() and len(sent) < 200:  # bounded: requests until the model is gone
            try:
                client.completions.create(model=mainjob.MODEL, prompt="The fox", max_tokens=8)
                sent.append(True)
            except openai.OpenAIError:
                sent.append(False)
    senders = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for sender in senders:
        sender.start()
    eventually(lambda: any(sent), 120, 0.2, "requests answered before the deletion")
    node.env.kubectl("delete", "languagemodel", "-n", NAMESPACE, mainjob.MODEL, "--timeout=300s")
    # The finalizer stopped the workers and the gateway before it removed the queues: none is left to
    # declare the queue again or to register the model again.
    assert not [p for p in kubectl_json(node, "get", "pods", "-n", NAMESPACE, "-l",
                                        f"kubelm.io/languagemodel={mainjob.MODEL}")["items"]
                if p["status"].get("phase") == "Running"]
    stop.set()
    for sender in senders:
        sender.join(timeout=60)
    # Checked once the load has stopped: a request the gateway still sent after the deletion found no queue.
    model_id = keys.model_id(NAMESPACE, mainjob.MODEL)
    assert rabbitmq_queue(node, queues.request_queue(NAMESPACE, mainjob.MODEL)) == 404
    assert rabbitmq_queue(node, queues.dead_letter_queue(NAMESPACE, mainjob.MODEL)) == 404
    assert redis_cli(node, "HEXISTS", keys.MODEL_REGISTRY, model_id) == "0"
    for pattern in (keys.response_pattern(model_id), keys.cache_stats(model_id)):
        assert redis_cli(node, "KEYS", pattern) == "", pattern
    eventually(lambda: not pods_of(node, mainjob.MODEL), 300, 1, "the model's pods gone")


def test_retain_keeps_the_queue_and_cache_entries_of_a_deleted_model(node: RealNode, trained: dict[str, Any]) -> None:
    name = "kept"
    apply(node, mainjob.language_model(NAMESPACE, name=name, queue={"deletionPolicy": "Retain"},
                                       cache={"deletionPolicy": "Retain"},
                                       autoscaling={"minReplicas": 0, "maxReplicas": 1}))
    queue = queues.request_queue(NAMESPACE, name)

    def declared_and_registered() -> bool:
        model = kubectl_json(node, "get", "languagemodel", "-n", NAMESPACE, name)
        return all(condition(model, kind).get("status") == "True" for kind in ("QueueReady", "CacheReady"))

    eventually(declared_and_registered, 300, 1, "the queue declared and the registry entry written")
    node.env.kubectl("delete", "languagemodel", "-n", NAMESPACE, name, "--timeout=300s")
    assert rabbitmq_queue(node, queue) == 200
    assert redis_cli(node, "HEXISTS", keys.MODEL_REGISTRY, keys.model_id(NAMESPACE, name)) == "1"


def test_deleting_the_training_job_cleans_up_its_job_and_pods(node: RealNode, trained: dict[str, Any]) -> None:
    def owned() -> list[str]:
        objects = kubectl_json(node, "get", "jobs,pods", "-n", NAMESPACE,
                               "-l", f"kubelm.io/trainingjob={mainjob.MODEL}")
        return [o["metadata"]["name"] for o in objects["items"]]

    assert owned()
    node.env.kubectl("delete", "trainingjob", "-n", NAMESPACE, mainjob.MODEL, "--timeout=300s")
    eventually(lambda: not owned(), 300, 1, "the training Job and its pods gone")
