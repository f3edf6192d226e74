"""The artifact cache: model directories stored in Redis as verified, versioned chunks.

A model directory is read as one stream (files in sorted order), cut into
fixed-size chunks and written with pipelined SETs. The manifest is written last,
so a version without a manifest is incomplete and never visible; the registry
entry then points at the new version. Fetching checks every chunk's digest and
every file's digest before the directory appears (an atomic rename), so a
corrupted or partial artifact is refused, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from kubelm_contract import keys

from .atomic import atomic_directory
from .redis_store import RedisStore

MANIFEST_FILE = "kubelm-manifest.json"
"""Written into every model directory the runtime produces; excluded from the content digest."""
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
MIN_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BYTES = 4 * 1024 * 1024 * 1024
FETCH_AHEAD_CHUNKS = 4


class ArtifactError(RuntimeError):
    pass


class ArtifactNotFound(ArtifactError):
    pass


class ArtifactCorrupt(ArtifactError):
    pass


class ArtifactTooLarge(ArtifactError):
    pass


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredArtifact:
    name: str
    version: int
    digest: str
    size: int
    chunk_bytes: int
    files: tuple[FileEntry, ...]
    chunks: tuple[str, ...]
    created: float

    @property
    def uri(self) -> str:
        return artifact_uri(self.name, self.version)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        data["chunks"] = list(self.chunks)
        return data

    @classmethod
    def from_json(cls, data: dict) -> StoredArtifact:
        return cls(
            name=data["name"], version=int(data["version"]), digest=data["digest"], size=int(data["size"]),
            chunk_bytes=int(data["chunk_bytes"]), files=tuple(FileEntry(**f) for f in data["files"]),
            chunks=tuple(data["chunks"]), created=float(data["created"]))


def artifact_uri(name: str, version: int) -> str:
    return f"artifact://{name}@{version}"


def parse_artifact_uri(uri: str) -> tuple[str, int | None]:
    """artifact://name[@version] -> (name, version or None for the latest)."""
    if not uri.startswith("artifact://"):
        raise ValueError(f"{uri!r} is not an artifact:// URI")
    rest = uri[len("artifact://"):]
    name, _, version = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if not name:
        raise ValueError(f"{uri!r}: missing artifact name")
    return name, int(version) if version else None


def content_digest(files: list[FileEntry] | tuple[FileEntry, ...]) -> str:
    """sha256 over the sorted (path, size, file digest) list: independent of chunking."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        if f.path != MANIFEST_FILE:
            h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return "sha256:" + h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def scan_directory(directory: Path) -> list[FileEntry]:
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        files.append(FileEntry(rel, path.stat().st_size, _sha256_file(path)))
    return files


def _stream_chunks(directory: Path, files: list[FileEntry], chunk_bytes: int) -> Iterator[bytes]:
    buffer = bytearray()
    for entry in files:
        with open(directory / entry.path, "rb") as fh:
            while block := fh.read(chunk_bytes - len(buffer)):
                buffer += block
                if len(buffer) == chunk_bytes:
                    yield bytes(buffer)
                    buffer.clear()
    if buffer:
        yield bytes(buffer)


def publish(store: RedisStore, directory: Path, name: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            max_bytes: int = DEFAULT_MAX_BYTES) -> StoredArtifact:
    """Stores a model directory as the next version of `name` and points the registry at it."""
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size {chunk_bytes} outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} bytes")
    files = scan_directory(directory)
    size = sum(f.size for f in files)
    if size > max_bytes:
        raise ArtifactTooLarge(
            f"artifact {name!r} is {size / 2**20:.1f} MiB, over the artifact cache limit of "
            f"{max_bytes / 2**20:.1f} MiB; raise the limit or publish to a volume instead")
    version = store.incr(keys.artifact_next_version(name))
    digests: list[str] = []

    def keyed_chunks() -> Iterator[tuple[str, bytes]]:
        for index, chunk in enumerate(_stream_chunks(directory, files, chunk_bytes)):
            digests.append(hashlib.sha256(chunk).hexdigest())
            yield keys.artifact_chunk(name, version, index), chunk

    store.put_many(keyed_chunks())
    artifact = StoredArtifact(name, version, content_digest(files), size, chunk_bytes, tuple(files),
                              tuple(digests), time.time())
    # The manifest marks the version complete; the registry entry makes it the latest.
    store.set_json(keys.artifact_manifest(name, version), artifact.to_json())
    store.hset_json(keys.ARTIFACT_REGISTRY, name, {
        "version": version, "digest": artifact.digest, "size": size, "uri": artifact.uri,
        "created": artifact.created})
    return artifact


def describe(store: RedisStore, name: str, version: int | None = None) -> StoredArtifact:
    if version is None:
        entry = store.hget_json(keys.ARTIFACT_REGISTRY, name)
        if entry is None:
            raise ArtifactNotFound(f"no artifact named {name!r} in the artifact cache")
        version = int(entry["version"])
    manifest = store.get_json(keys.artifact_manifest(name, version))
    if manifest is None:
        raise ArtifactNotFound(f"artifact {name!r} has no complete version {version}")
    return StoredArtifact.from_json(manifest)


class _FileWriter:
    """Places the artifact stream into its files, hashing each file as it is written."""

    def __init__(self, root: Path, files: tuple[FileEntry, ...]):
        self.root = root
        self.files = files
        self.index = 0
        self.written = 0
        self.handle: BinaryIO | None = None
        self.hash = hashlib.sha256()
        self._open_next()

    def _open_next(self) -> None:
        while self.index < len(self.files):
            entry = self.files[self.index]
            path = self.root / entry.path
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "wb")  # noqa: SIM115 - closed in _finish_file
            self.hash = hashlib.sha256()
            self.written = 0
            if entry.size:
                return
            self._finish_file()

    def _finish_file(self) -> None:
        entry = self.files[self.index]
        assert self.handle is not None
        self.handle.close()
        self.handle = None
        if self.hash.hexdigest() != entry.sha256:
            raise ArtifactCorrupt(f"file {entry.path} does not match its digest")
        self.index += 1

    def write(self, data: memoryview) -> None:
        while data:
            if self.index >= len(self.files):
                raise ArtifactCorrupt("artifact has more bytes than its manifest lists")
            entry = self.files[self.index]
            take = min(len(data), entry.size - self.written)
            piece = data[:take]
            assert self.handle is not None
            self.handle.write(piece)
            self.hash.update(piece)
            self.written += take
            data = data[take:]
            if self.written == entry.size:
                self._finish_file()
                self._open_next()

    def close(self) -> None:
        if self.index != len(self.files):
            raise ArtifactCorrupt("artifact ended before all files were complete")


def fetch(store: RedisStore, name: str, destination: Path, version: int | None = None) -> StoredArtifact:
    """Downloads and verifies an artifact into `destination` (replaced atomically)."""
    artifact = describe(store, name, version)
    if content_digest(artifact.files) != artifact.digest:
        raise ArtifactCorrupt(f"artifact {name}@{artifact.version}: manifest file list does not match its digest")
    with atomic_directory(destination.resolve()) as staging:
        writer = _FileWriter(staging, artifact.files)
        chunk_keys = [keys.artifact_chunk(name, artifact.version, i) for i in range(len(artifact.chunks))]
        # Three stages overlap: a thread fetches ahead, another checks chunk digests, and this one
        # writes and hashes files. Sockets and hashlib release the GIL on large buffers.
        with ThreadPoolExecutor(max_workers=1) as fetcher, ThreadPoolExecutor(max_workers=1) as hasher:
            pending = [fetcher.submit(store.get, k) for k in chunk_keys[:FETCH_AHEAD_CHUNKS]]
            checks = []
            for index in range(len(chunk_keys)):
                chunk = pending.pop(0).result()
                if index + FETCH_AHEAD_CHUNKS < len(chunk_keys):
                    pending.append(fetcher.submit(store.get, chunk_keys[index + FETCH_AHEAD_CHUNKS]))
                if chunk is None:
                    raise ArtifactCorrupt(f"artifact {name}@{artifact.version}: chunk {index} missing")
                checks.append(hasher.submit(_chunk_ok, chunk, artifact.chunks[index]))
                writer.write(memoryview(chunk))
            for index, check in enumerate(checks):
                if not check.result():
                    raise ArtifactCorrupt(
                        f"artifact {name}@{artifact.version}: chunk {index} does not match its digest")
        writer.close()
    return artifact


def _chunk_ok(chunk: bytes | None, expected: str) -> bool:
    return chunk is not None and hashlib.sha256(chunk).hexdigest() == expected


def delete(store: RedisStore, name: str) -> int:
    """Removes every version of an artifact and its registry entry (for finalizers)."""
    return store.delete_matching(keys.artifact_pattern(name)) + store.hdel(keys.ARTIFACT_REGISTRY, name)


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text())
