"""kubelm-runtime: the one entry point of the runtime image.

  kubelm-runtime train [--config FILE]            fine-tune (configuration: docs/runtime-contract.md)
  kubelm-runtime serve [--config FILE]            an inference worker consuming a model's request queue
  kubelm-runtime gateway [--config FILE]          the OpenAI-compatible HTTP gateway
  kubelm-runtime artifact publish DIR --name N    store a model directory in the artifact cache
  kubelm-runtime artifact fetch NAME[@V] DEST     fetch and verify an artifact into DEST
  kubelm-runtime tiny-model --corpus F --out D    build a tiny GPT-2 and tokenizer (tests, demos)

Exit codes: 0 done, 1 failed while running, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from kubelm_contract import env
from kubelm_contract.settings import SettingsError

from . import allocator
from .artifacts import ArtifactError
from .train.errors import DataError

TORCH_COMMANDS = ("serve",)
"""Subcommands whose speed depends on the allocator (kubelm_runtime.allocator): they re-execute with jemalloc."""


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=os.environ.get(env.LOG_LEVEL, "INFO").upper(),
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", stream=sys.stderr)
    # Progress bars and advice meant for notebooks only clutter pod logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("pika").setLevel(logging.WARNING)


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.loop import run
    from .train.settings import TrainConfig

    config = load_config(TrainConfig, args.config)
    result = run(config, os.environ.get(env.REDIS_URL))
    print(json.dumps({k: v for k, v in result.items() if k != "manifest"}))
    return 0


def _require(variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise SettingsError(f"{variable} is not set")
    return value


def _serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .models import ModelLoadError
    from .serve.settings import ServeConfig
    from .serve.worker import run

    config = load_config(ServeConfig, args.config)
    try:
        run(config, _require(env.AMQP_URL), os.environ.get(env.REDIS_URL))
    except ModelLoadError as e:
        # One line where people and the operator look: the log and the container's termination message.
        logging.getLogger("kubelm_runtime.serve").error("%s", e)
        with contextlib.suppress(OSError):
            Path(os.environ.get(env.TERMINATION_LOG, "/dev/termination-log")).write_text(str(e))
        return 1
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from .config import load_config
    from .serve.gateway import run
    from .serve.settings import GatewayConfig

    config = load_config(GatewayConfig, args.config) if (args.config or os.environ.get(env.CONFIG_FILE)) \
        else GatewayConfig()
    run(config, _require(env.AMQP_URL), os.environ.get(env.REDIS_URL))
    return 0


def _store():  # type: ignore[no-untyped-def]
    from .redis_store import RedisStore

    return RedisStore(_require(env.REDIS_URL), timeout=30)


def _artifact(args: argparse.Namespace) -> int:
    from . import artifacts

    store = _store()
    if args.action == "publish":
        stored = artifacts.publish(store, Path(args.path), args.name)
        print(json.dumps({"uri": stored.uri, "digest": stored.digest, "size": stored.size}))
    elif args.action == "delete":
        name = args.name.removeprefix("artifact://")
        removed = artifacts.delete(store, name)
        print(json.dumps({"name": name, "keysRemoved": removed}))
        return 0 if removed else 1
    else:
        name, version = artifacts.parse_artifact_uri(
            args.name if args.name.startswith("artifact://") else f"artifact://{args.name}")
        stored = artifacts.fetch(store, name, Path(args.path), version)
        print(json.dumps({"uri": stored.uri, "digest": stored.digest, "path": args.path}))
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from .tinymodel import TinyShape, build

    shape = TinyShape(vocab_size=args.vocab_size, n_layer=args.layers, n_head=args.heads, n_embd=args.embd,
                      n_positions=args.positions)
    print(build(Path(args.out), [Path(c) for c in args.corpus], shape))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubelm-runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a causal LM")
    train.add_argument("--config", help=f"JSON or YAML file (default: ${env.CONFIG_FILE})")
    train.set_defaults(handler=_train)

    serve = sub.add_parser("serve", help="run an inference worker")
    serve.add_argument("--config", help=f"JSON or YAML file (default: ${env.CONFIG_FILE})")
    serve.set_defaults(handler=_serve)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway")
    gateway.add_argument("--config", help=f"JSON or YAML file (default: ${env.CONFIG_FILE}; optional)")
    gateway.set_defaults(handler=_gateway)

    artifact = sub.add_parser("artifact", help="publish, fetch or delete artifact cache entries")
    artifact.add_argument("action", choices=["publish", "fetch", "delete"])
    artifact.add_argument("first", metavar="DIR|NAME[@VERSION]")
    artifact.add_argument("second", nargs="?", metavar="DEST")
    artifact.add_argument("--name", dest="publish_name")
    artifact.set_defaults(handler=_artifact)

    tiny = sub.add_parser("tiny-model", help="build a tiny GPT-2 and tokenizer from a local corpus")
    tiny.add_argument("--corpus", nargs="+", required=True)
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--vocab-size", type=int, default=512)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=2)
    tiny.add_argument("--embd", type=int, default=64)
    tiny.add_argument("--positions", type=int, default=256)
    tiny.set_defaults(handler=_tiny_model)

    args = parser.parse_args(argv)
    if args.command == "artifact":
        if args.action == "publish":
            if not args.publish_name:
                parser.error("artifact publish needs --name")
            args.path, args.name = args.first, args.publish_name
        elif args.action == "delete":
            args.name = args.first
        else:
            if not args.second:
                parser.error("artifact fetch needs NAME[@VERSION] DEST")
            args.name, args.path = args.first, args.second
    _setup_logging()
    try:
        if argv is None and args.command in TORCH_COMMANDS:  # a program of its own, not a caller's function
            allocator.reexec_with_jemalloc()
        return int(args.handler(args))
    except SettingsError as e:
        print(f"kubelm-runtime: invalid configuration: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"kubelm-runtime: unusable data: {e}", file=sys.stderr)
        return 2
    except ArtifactError as e:
        print(f"kubelm-runtime: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
