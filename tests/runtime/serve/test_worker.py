"""A worker in this process, on the real RabbitMQ, with an engine whose decode step breaks."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kubelm_contract import protocol, queues
from kubelm_contract.settings import load
from kubelm_runtime.broker import RpcClient, new_request_id
from kubelm_runtime.serve.engine import Batch, Engine
from kubelm_runtime.serve.settings import ServeConfig
from kubelm_runtime.serve.worker import Worker
from support import ClusterEnv, eventually

from .test_serving import _dead_letters

pytestmark = [pytest.mark.services]


def test_a_failing_decode_step_answers_every_request_in_the_batch_and_dead_letters_it(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    config = load(ServeConfig, {"name": "broken", "namespace": namespace, "model": {"uri": str(tiny_model)},
                                "cacheDir": str(tmp_path), "dtype": "fp32",
                                "batching": {"maxBatchSize": 4, "maxWaitMillis": 200}})
    engine = Engine.load(str(tiny_model), dtype="fp32")

    def broken_step(batch: Batch) -> list[Any]:
        raise RuntimeError("simulated device failure")

    engine.step = broken_step  # type: ignore[method-assign]  # the prefill works, decoding fails
    worker = Worker(config, cluster.amqp_url, None, engine, "digest")
    running = threading.Thread(target=worker.run, daemon=True)
    running.start()
    client = RpcClient(cluster.amqp_url)
    client.start()

    async def ask(prompt: str) -> dict[str, Any]:
        request_id = new_request_id()
        body = json.dumps({"v": protocol.VERSION, "id": request_id, "prompts": [prompt], "model": "broken",
                           "params": {"max_new_tokens": 4}, "deadline": time.time() + 60}).encode()
        return json.loads(await client.call(queues.request_queue(namespace, "broken"), body, request_id, 30))

    async def ask_together() -> list[dict[str, Any]]:
        return list(await asyncio.gather(ask("the old fox"), ask("two")))

    try:
        eventually(lambda: worker.health.ready, timeout=30, what="worker consuming")
        replies = asyncio.run(ask_together())
    finally:
        client.close()
        worker.draining = True
        running.join(30)
    assert not running.is_alive() and not worker.channel.unacked
    for reply in replies:
        assert reply["ok"] is False
        assert reply["error"]["type"] == protocol.INTERNAL
        assert "simulated device failure" in reply["error"]["message"]
    dead: list[tuple[dict, bytes]] = []
    eventually(lambda: len(dead.__iadd__(_dead_letters(cluster, namespace, "broken"))) >= 2, timeout=10,
               what="both requests dead-lettered")
    assert {headers[queues.ERROR_TYPE_HEADER] for headers, _ in dead} == {protocol.INTERNAL}
    errors = worker.metrics.registry.get_sample_value("kubelm_errors_total", {"type": protocol.INTERNAL})
    assert errors == 2
