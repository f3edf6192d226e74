"""The main job: a local cluster trains a tiny model and answers a prompt with it.

1. start the dev cluster (control plane, Redis, RabbitMQ) and install the CRDs;
2. create a TrainingJob for the tiny corpus (the operator that will run it as pods
   is on the roadmap; here its runtime runs as a local process, exactly as the pod would);
3. train a tiny GPT-2 built from config with `kubelm-runtime train`, with progress in
   Redis and the model published to the artifact cache;
4. fetch the artifact back (digest-verified) and generate a completion from it.

    python scripts/demo.py [--steps 300] [--keep-cluster]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from kubelm_contract import env, keys
from kubelm_devcluster import cli as devcluster
from kubelm_runtime import artifacts
from kubelm_runtime.models import load_causal_lm, load_tokenizer
from kubelm_runtime.redis_store import RedisStore

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "tiny-corpus"


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--keep-cluster", action="store_true", help="leave the dev cluster running afterwards")
    args = parser.parse_args()

    say("starting the dev cluster")
    cluster = devcluster.up(devcluster.DEFAULT_DIR)
    connection = cluster.env()
    kubectl = [str(cluster.layout.bin_dir / "kubectl"), f"--kubeconfig={connection[env.KUBECONFIG]}"]
    print(f"ready in {cluster.ready_seconds:.1f}s; KUBECONFIG={connection[env.KUBECONFIG]}")
    try:
        subprocess.run([*kubectl, "apply", "--server-side", "-k", str(REPO / "crds")], check=True)
        subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/trainingjobs.kubelm.io"], check=True)

        with tempfile.TemporaryDirectory(prefix="kubelm-demo-") as tmp_name:
            tmp = Path(tmp_name)
            say("building a tiny GPT-2 and tokenizer from the local corpus")
            base = tmp / "base-model"
            subprocess.run([sys.executable, "-m", "kubelm_runtime", "tiny-model", "--corpus",
                            str(CORPUS / "train.txt"), "--out", str(base)], check=True, stdout=subprocess.DEVNULL)

            job = {
                "apiVersion": "kubelm.io/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "tiny-story"},
                "spec": {"baseModel": {"uri": str(base)},
                         "dataset": {"train": str(CORPUS / "train.txt"), "validation": str(CORPUS / "valid.txt"),
                                     "test": str(CORPUS / "test.txt")},
                         "hyperparameters": {"maxSteps": args.steps, "batchSize": 16, "maxLength": 64,
                                             "learningRate": 0.003, "warmupSteps": 20, "evalIntervalSteps": 100},
                         "checkpointing": {"intervalSteps": 100}}}
            subprocess.run([*kubectl, "apply", "--server-side", "-f", "-"], input=yaml.safe_dump(job), text=True,
                           check=True)
            say("TrainingJob as the apiserver stored it (defaults applied)")
            subprocess.run([*kubectl, "get", "tj", "tiny-story", "-o", "jsonpath={.spec}"], check=True)
            print()

            config = {"jobId": "default/tiny-story", "outputDir": str(tmp / "out"), "logIntervalSteps": 50,
                      **{k: v for k, v in job["spec"].items()}}  # type: ignore[dict-item]
            (tmp / "train.yaml").write_text(yaml.safe_dump(config))
            say(f"training {args.steps} steps with kubelm-runtime train")
            subprocess.run([sys.executable, "-m", "kubelm_runtime", "train", "--config", str(tmp / "train.yaml")],
                           check=True, env={**os.environ, **connection})

            store = RedisStore(connection[env.REDIS_URL])
            progress = store.get_json(keys.progress("default/tiny-story"))
            say("progress the operator will mirror into TrainingJob status")
            print(json.dumps(progress, indent=2))

            say("fetching the published artifact (digest-verified) and generating")
            served = tmp / "served"
            stored = artifacts.fetch(store, "default/tiny-story", served)
            print(f"{stored.uri} {stored.digest} {stored.size / 2**20:.1f} MiB")
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
            tokenizer = load_tokenizer(str(served))
            model = load_causal_lm(str(served)).eval()
            for prompt in ("two plus three is", "the old fox"):
                ids = tokenizer(prompt, return_tensors="pt")
                out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                print(f"{prompt!r} -> {tokenizer.decode(out[0][ids['input_ids'].shape[1]:])!r}")
    finally:
        if not args.keep_cluster:
            say("stopping the dev cluster")
            devcluster.down(devcluster.DEFAULT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
