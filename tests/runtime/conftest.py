from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kubelm_devcluster.standalone import RedisServer
from support import REPO

CORPUS = REPO / "examples" / "tiny-corpus"


@pytest.fixture(scope="session")
def corpus() -> dict[str, Path]:
    return {split: CORPUS / f"{split}.txt" for split in ("train", "valid", "test")}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, Path]) -> Path:
    """A 2-layer GPT-2 with a 512-token BPE tokenizer trained on the tiny corpus."""
    from kubelm_runtime.tinymodel import build

    return build(tmp_path_factory.mktemp("tiny-model"), [corpus["train"]])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the trainer handles it."""


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, Path]) -> Path:
    """The first 150 lines of the sample corpus: a few steps of training."""
    path = tmp_path_factory.mktemp("small-corpus") / "train.txt"
    path.write_text("\n".join(corpus["train"].read_text().splitlines()[:150]) + "\n")
    return path
