"""kubelm's runtime image doing its real work as pods on the real node, against the dev overlay's
in-cluster Redis and RabbitMQ: a training Job publishes its model, workers and a gateway serve it
through a Service, and a worker deleted mid-batch drains without losing a request.

Nothing here runs the operator: the pods are what its builders make, written out by hand, so that a
failure points at the node, the images or the runtime.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml

from kubelm_contract import env as contract_env
from node_support import RESTRICTED, RealNode, answers, apply, deployment, port_forward
from support import REPO, eventually

pytestmark = [pytest.mark.slow]

SYSTEM = "kubelm-system"
REDIS_URL = f"redis://redis.{SYSTEM}.svc:6379/0"
AMQP_URL = f"amqp://kubelm:kubelm@rabbitmq.{SYSTEM}.svc:5672/%2F"
MODEL = "tiny"


@pytest.fixture(scope="module")
def node(real_node: RealNode) -> Iterator[RealNode]:
    """The real node with the dev overlay's Redis and RabbitMQ running."""
    real_node.env.kubectl("apply", "--server-side", "--field-manager=kubelm-tests", "-k", str(REPO / "manifests/dev"))
    for name in ("redis", "rabbitmq"):
        real_node.env.kubectl("rollout", "status", "-n", SYSTEM, f"statefulset/{name}", "--timeout=300s")
    yield real_node


@pytest.fixture(scope="module")
def namespace(node: RealNode) -> Iterator[str]:
    name = "runtime-on-node"
    node.env.kubectl("create", "namespace", name)
    yield name
    node.env.kubectl("delete", "namespace", name, "--wait=false", check=False)


def workload(name: str, main: dict[str, Any], config_name: str, grace: int = 30) -> dict[str, Any]:
    return deployment(name, main, securityContext=POD_SECURITY, terminationGracePeriodSeconds=grace,
                      volumes=volumes({"name": "config", "configMap": {"name": config_name}}))


def volumes(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}, *extra]


def container(name: str, image: str, args: list[str], *mounts: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "args": args,
        "env": [{"name": contract_env.REDIS_URL, "value": REDIS_URL},
                {"name": contract_env.AMQP_URL, "value": AMQP_URL}],
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "cache", "mountPath": "/var/cache/kubelm"}, {"name": "tmp", "mountPath": "/tmp"},
                         *mounts],
        **fields,
    }


def config_map(name: str, files: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": files}


POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}


def job_finished(node: RealNode, namespace: str, name: str) -> str | None:
    conditions = json.loads(node.env.kubectl("get", "job", "-n", namespace, name, "-o", "json").stdout)
    for condition in conditions.get("status", {}).get("conditions", []):
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return str(condition["type"])
    return None


def post(url: str, body: dict[str, Any], timeout: float = 600) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} at {url}")


@pytest.fixture(scope="module")
def trained(node: RealNode, namespace: str) -> str:
    """A training Job builds a tiny model from the sample corpus, fine-tunes it and publishes the artifact."""
    corpus = REPO / "examples" / "tiny-corpus"
    # kubectl create keeps the 550 KB corpus out of an apply annotation (256 KiB at most).
    node.env.kubectl("create", "configmap", "corpus", "-n", namespace,
                     *(f"--from-file={corpus / f'{split}.txt'}" for split in ("train", "valid", "test")))
    train_config = {
        "jobId": f"{namespace}/{MODEL}",
        "baseModel": {"uri": "/scratch/base"},
        "dataset": {"train": "/corpus/train.txt", "validation": "/corpus/valid.txt", "test": "/corpus/test.txt"},
        "outputDir": "/scratch/job",
        "hyperparameters": {"maxSteps": 10, "batchSize": 8, "maxLength": 64, "learningRate": 0.003,
                            "evalIntervalSteps": 5},
        "checkpointing": {"intervalSteps": 5, "keep": 1},
        "logIntervalSteps": 1,
    }
    image = node.image("kubelm/runtime")
    scratch = {"name": "scratch", "mountPath": "/scratch"}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "securityContext": POD_SECURITY,
                "initContainers": [container("base-model", image, ["tiny-model", "--corpus", "/corpus/train.txt",
                                                                   "--out", "/scratch/base"],
                                             scratch, {"name": "corpus", "mountPath": "/corpus"})],
                "containers": [container("train", image, ["train", "--config", "/etc/kubelm/train.yaml"],
                                         scratch, {"name": "corpus", "mountPath": "/corpus"},
                                         {"name": "config", "mountPath": "/etc/kubelm"})],
                "volumes": volumes({"name": "scratch", "emptyDir": {}},
                                   {"name": "corpus", "configMap": {"name": "corpus"}},
                                   {"name": "config", "configMap": {"name": "train-config"}}),
            }},
        },
    }
    apply(node, namespace, config_map("train-config", {"train.yaml": yaml.safe_dump(train_config)}), job)
    eventually(lambda: job_finished(node, namespace, "train") is not None, 600, 1, "training Job finished")
    logs = node.env.kubectl("logs", "-n", namespace, "job/train", "-c", "train").stdout
    assert job_finished(node, namespace, "train") == "Complete", logs[-3000:]
    return logs


def test_a_training_job_publishes_its_model_to_the_in_cluster_cache(trained: str) -> None:
    assert "published artifact://runtime-on-node/tiny@1" in trained, trained[-3000:]


@pytest.fixture(scope="module")
def serving(node: RealNode, namespace: str, trained: str) -> Iterator[str]:
    """One worker serving the trained artifact and a gateway behind a Service, both Ready through probes."""
    image = node.image("kubelm/runtime")
    serve_config = {
        "name": MODEL,
        "namespace": namespace,
        "model": {"artifact": f"artifact://{namespace}/{MODEL}"},
        "batching": {"maxBatchSize": 8, "maxWaitMillis": 10},
        "healthPort": 8081,
    }
    gateway_config = {"namespace": namespace, "models": [MODEL], "requestTimeoutSeconds": 600}
    config = {"name": "config", "mountPath": "/etc/kubelm"}
    worker = workload("worker", container(
        "worker", image, ["serve", "--config", "/etc/kubelm/serve.yaml"], config,
        ports=[{"name": "health", "containerPort": 8081}],
        readinessProbe={"httpGet": {"path": "/readyz", "port": "health"}, "periodSeconds": 1},
        livenessProbe={"httpGet": {"path": "/livez", "port": "health"}, "periodSeconds": 10},
    ), "serve-config", grace=120)
    gateway = workload("gateway", container(
        "gateway", image, ["gateway", "--config", "/etc/kubelm/gateway.yaml"], config,
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
    ), "gateway-config")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gateway"},
               "spec": {"selector": {"app": "gateway"}, "ports": [{"port": 80, "targetPort": "http"}]}}
    apply(node, namespace, config_map("serve-config", {"serve.yaml": yaml.safe_dump(serve_config)}),
          config_map("gateway-config", {"gateway.yaml": yaml.safe_dump(gateway_config)}), worker, gateway, service)
    for name in ("worker", "gateway"):
        node.env.kubectl("rollout", "status", "-n", namespace, f"deployment/{name}", "--timeout=600s")
    # Through the Service from any cluster: kubectl port-forward resolves it to a ready pod.
    with port_forward(node, namespace, "service/gateway", 80) as url:
        eventually(lambda: answers(f"{url}/readyz"), 120, 0.5, "the gateway answers")
        yield url


def test_the_trained_model_answers_through_the_gateway_service(serving: str) -> None:
    status, body = post(f"{serving}/v1/completions",
                        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["text"]


def worker_pod(node: RealNode, namespace: str) -> str:
    pods = json.loads(node.env.kubectl("get", "pods", "-n", namespace, "-l", "app=worker", "-o", "json").stdout)
    running = [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]
    assert len(running) == 1, [p["metadata"]["name"] for p in running]
    return str(running[0]["metadata"]["name"])


def test_a_worker_deleted_mid_batch_drains_and_no_request_is_lost(node: RealNode, namespace: str,
                                                                   serving: str) -> None:
    pod = worker_pod(node, namespace)
    # Follow the worker's output through the kubelet until its container exits.
    follow = subprocess.Popen([node.env.kubectl_path, f"--kubeconfig={node.env.kubeconfig}", "logs", "-f",
                               "-n", namespace, pod], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"{serving}/v1/completions"
    with port_forward(node, namespace, f"pod/{pod}", 8081) as health, ThreadPoolExecutor(max_workers=8) as pool:
        batches_before = metric(f"{health}/metrics", "kubelm_batch_size_count")
        futures = [pool.submit(post, url, {"model": MODEL, "prompt": f"story {i}", "max_tokens": 150,
                                           "temperature": 0.9}) for i in range(8)]
        eventually(lambda: metric(f"{health}/metrics", "kubelm_batch_size_count") > batches_before,
                   120, 0.05, "the worker is decoding a batch")
        assert not all(f.done() for f in futures)
        node.env.kubectl("delete", "pod", "-n", namespace, pod, "--wait=false")
        results = [f.result() for f in futures]
    output, _ = follow.communicate(timeout=180)
    assert [status for status, _ in results] == [200] * 8, results
    assert "drained and stopped" in output, output[-3000:]
