"""The artifact cache against a real Redis: round trip, versions, corruption and limits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from kubelm_contract import keys
from kubelm_devcluster.standalone import RedisServer
from kubelm_runtime import artifacts
from kubelm_runtime.models import load_causal_lm
from kubelm_runtime.redis_store import RedisStore

pytestmark = pytest.mark.services


@pytest.fixture
def store(private_redis: RedisServer) -> RedisStore:
    return RedisStore(private_redis.url)


def _model_dir(tiny_model: Path, tmp_path: Path) -> Path:
    # Extra files make the stream cross file boundaries inside chunks, and include an empty file.
    directory = tmp_path / "model"
    shutil.copytree(tiny_model, directory)
    (directory / "nested").mkdir()
    (directory / "nested" / "blob.bin").write_bytes(bytes(range(256)) * 9000)
    (directory / "empty.txt").write_text("")
    return directory


def test_round_trip_is_verified_and_loadable(store: RedisStore, tiny_model: Path, tmp_path: Path) -> None:
    source = _model_dir(tiny_model, tmp_path)
    stored = artifacts.publish(store, source, "ns/tiny", chunk_bytes=artifacts.MIN_CHUNK_BYTES)
    assert stored.version == 1 and len(stored.chunks) >= 2
    assert stored.digest == artifacts.content_digest(artifacts.scan_directory(source))

    fetched = artifacts.fetch(store, "ns/tiny", tmp_path / "fetched")
    assert fetched.digest == stored.digest
    for entry in stored.files:
        assert (tmp_path / "fetched" / entry.path).read_bytes() == (source / entry.path).read_bytes()

    original = load_causal_lm(str(source)).eval()
    loaded = load_causal_lm(str(tmp_path / "fetched")).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(original(ids).logits, loaded(ids).logits)


def test_versions_and_registry(store: RedisStore, tiny_model: Path, tmp_path: Path) -> None:
    source = _model_dir(tiny_model, tmp_path)
    first = artifacts.publish(store, source, "ns/tiny")
    (source / "extra.txt").write_text("changed")
    second = artifacts.publish(store, source, "ns/tiny")
    assert (first.version, second.version) == (1, 2) and first.digest != second.digest
    assert store.hget_json(keys.ARTIFACT_REGISTRY, "ns/tiny")["version"] == 2
    assert artifacts.describe(store, "ns/tiny").version == 2
    artifacts.fetch(store, "ns/tiny", tmp_path / "v1", version=1)
    assert not (tmp_path / "v1" / "extra.txt").exists()
    assert artifacts.parse_artifact_uri(second.uri) == ("ns/tiny", 2)


def _published_with_a_corrupt_chunk(store: RedisStore, directory: Path) -> artifacts.StoredArtifact:
    """`ns/tiny` published in small chunks, then one byte of chunk 1 flipped in Redis."""
    stored = artifacts.publish(store, directory, "ns/tiny", chunk_bytes=artifacts.MIN_CHUNK_BYTES)
    key = keys.artifact_chunk("ns/tiny", stored.version, 1)
    chunk = bytearray(store.get(key) or b"")
    chunk[100] ^= 0xFF
    store.set(key, bytes(chunk))
    return stored


def test_corrupted_chunk_is_refused_and_nothing_is_left(store: RedisStore, tiny_model: Path, tmp_path: Path) -> None:
    _published_with_a_corrupt_chunk(store, _model_dir(tiny_model, tmp_path))
    with pytest.raises(artifacts.ArtifactCorrupt, match=r"file .* does not match its digest"):
        artifacts.fetch(store, "ns/tiny", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


def test_a_chunk_is_checked_against_its_own_digest(store: RedisStore, tiny_model: Path, tmp_path: Path) -> None:
    """A corrupted chunk whose files' digests were rewritten to match it (so the file checks pass) is still
    refused by the chunk's digest."""
    stored = _published_with_a_corrupt_chunk(store, _model_dir(tiny_model, tmp_path))
    content = b"".join(store.get(keys.artifact_chunk("ns/tiny", stored.version, i)) or b""
                       for i in range(len(stored.chunks)))
    files, offset = [], 0
    for entry in stored.files:
        files.append(dataclasses.replace(entry, sha256=hashlib.sha256(content[offset:offset + entry.size]).hexdigest()))
        offset += entry.size
    forged = dataclasses.replace(stored, files=tuple(files), digest=artifacts.content_digest(files))
    store.set_json(keys.artifact_manifest("ns/tiny", stored.version), forged.to_json())
    with pytest.raises(artifacts.ArtifactCorrupt, match="chunk 1 does not match its digest"):
        artifacts.fetch(store, "ns/tiny", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_missing_chunk_and_unknown_artifact(store: RedisStore, tiny_model: Path, tmp_path: Path) -> None:
    stored = artifacts.publish(store, _model_dir(tiny_model, tmp_path), "ns/tiny",
                               chunk_bytes=artifacts.MIN_CHUNK_BYTES)
    store.delete_matching(keys.artifact_chunk("ns/tiny", stored.version, 0))
    with pytest.raises(artifacts.ArtifactCorrupt, match="chunk 0 missing"):
        artifacts.fetch(store, "ns/tiny", tmp_path / "dest")
    with pytest.raises(artifacts.ArtifactNotFound, match="no artifact named 'nope'"):
        artifacts.fetch(store, "nope", tmp_path / "dest")


def test_size_limit_has_a_clear_error(store: RedisStore, tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(artifacts.ArtifactTooLarge, match="over the artifact cache limit"):
        artifacts.publish(store, _model_dir(tiny_model, tmp_path), "ns/tiny", max_bytes=1024)
    assert store.hget_json(keys.ARTIFACT_REGISTRY, "ns/tiny") is None


def test_delete_removes_every_key(store: RedisStore, tiny_model: Path, tmp_path: Path) -> None:
    artifacts.publish(store, _model_dir(tiny_model, tmp_path), "ns/tiny")
    assert artifacts.delete(store, "ns/tiny") > 1
    with pytest.raises(artifacts.ArtifactNotFound):
        artifacts.describe(store, "ns/tiny")


@pytest.mark.parametrize("chunk_bytes", [1000, 9 * 1024 * 1024])
def test_chunk_size_bounds(store: RedisStore, tmp_path: Path, chunk_bytes: int) -> None:
    with pytest.raises(ValueError, match="chunk size"):
        artifacts.publish(store, tmp_path, "x", chunk_bytes=chunk_bytes)


def test_cli_deletes_every_version_of_an_artifact(private_redis: RedisServer, store: RedisStore, tiny_model: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from kubelm_runtime import cli

    monkeypatch.setenv("KUBELM_REDIS_URL", private_redis.url)
    for _ in range(2):
        assert cli.main(["artifact", "publish", str(tiny_model), "--name", "ns/old"]) == 0
    artifacts.publish(store, tiny_model, "ns/kept")
    assert cli.main(["artifact", "delete", "artifact://ns/old"]) == 0
    assert '"name": "ns/old"' in capsys.readouterr().out
    assert store.hget_json(keys.ARTIFACT_REGISTRY, "ns/old") is None
    assert cli.main(["artifact", "fetch", "ns/old@1", str(tmp_path / "gone")]) == 1
    assert "ns/old" in capsys.readouterr().err
    assert artifacts.describe(store, "ns/kept").version == 1
    assert cli.main(["artifact", "delete", "ns/old"]) == 1  # nothing left to remove


def test_a_manifest_whose_file_list_does_not_match_its_digest_is_refused(store: RedisStore, tiny_model: Path,
                                                                        tmp_path: Path) -> None:
    stored = artifacts.publish(store, _model_dir(tiny_model, tmp_path), "ns/tiny")
    forged = dataclasses.replace(stored, digest="sha256:" + "0" * 64)
    store.set_json(keys.artifact_manifest("ns/tiny", stored.version), forged.to_json())
    with pytest.raises(artifacts.ArtifactCorrupt, match="manifest file list does not match its digest"):
        artifacts.fetch(store, "ns/tiny", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_cli_builds_a_tiny_model_publishes_and_fetches_it(private_redis: RedisServer, corpus: dict[str, Path],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from kubelm_runtime import cli

    built = tmp_path / "built"
    assert cli.main(["tiny-model", "--corpus", str(corpus["train"]), "--out", str(built), "--vocab-size", "300",
                     "--layers", "1", "--embd", "32", "--positions", "64"]) == 0
    model = load_causal_lm(str(built))
    assert model.config.n_layer == 1 and model.config.n_embd == 32
    monkeypatch.setenv("KUBELM_REDIS_URL", private_redis.url)
    capsys.readouterr()
    assert cli.main(["artifact", "publish", str(built), "--name", "ns/built"]) == 0
    published = json.loads(capsys.readouterr().out)
    assert cli.main(["artifact", "fetch", "artifact://ns/built", str(tmp_path / "fetched")]) == 0
    fetched = json.loads(capsys.readouterr().out)
    assert fetched["digest"] == published["digest"] == artifacts.content_digest(
        artifacts.scan_directory(tmp_path / "fetched"))
