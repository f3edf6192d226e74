"""The registry entry's shape, which workers and the operator both write and the gateway reads."""

from __future__ import annotations

from kubelm_contract.protocol import Decoding, Limits
from kubelm_contract.registry import describe_hub, model_entry, source_digest


def test_model_entry() -> None:
    hub = describe_hub("gpt2", "main")
    entry = model_entry(queue="kubelm.ns.m.requests", namespace="ns", digest=source_digest(hub), source=hub,
                        limits=Limits(1024, 512), defaults=Decoding(max_new_tokens=64, stop=("\n",)),
                        response_cache=True, phase="Ready")
    assert entry == {
        "queue": "kubelm.ns.m.requests", "namespace": "ns", "digest": "source:hub:gpt2@main",
        "source": "hub:gpt2@main", "maxNewTokens": 512, "maxInputTokens": 1024,
        "defaults": {"max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                     "stop": ["\n"], "seed": None},
        "responseCache": True, "status": "Ready"}
    assert "status" not in model_entry(queue="q", namespace="ns", digest=None, source="s", limits=Limits(),
                                       defaults=Decoding(), response_cache=False)
