from __future__ import annotations

import fnmatch

import pytest

from kubelm_contract import env, keys
from kubelm_contract.volumes import LocationError, claim_of, local_path


def test_artifact_keys_share_one_hash_tag() -> None:
    tagged = [keys.artifact_manifest("ns/m", 3), keys.artifact_chunk("ns/m", 3, 0), keys.artifact_next_version("ns/m")]
    assert all("{ns/m}" in k and k.startswith("kubelm:v1:") for k in tagged)
    assert keys.artifact_pattern("ns/m") == "kubelm:v1:artifact:{ns/m}:*"
    assert keys.progress("ns/job") == "kubelm:v1:progress:{ns/job}"
    assert fnmatch.fnmatchcase(keys.response("ns/m", "ab12"), keys.response_pattern("ns/m"))
    assert not fnmatch.fnmatchcase(keys.response("ns/other", "ab12"), keys.response_pattern("ns/m"))


@pytest.mark.parametrize(("uri", "path"), [
    ("pvc://data/train/a.txt", "/mnt/kubelm/volumes/data/train/a.txt"),
    ("pvc://data", "/mnt/kubelm/volumes/data"),
    ("file:///srv/model", "/srv/model"),
    ("/srv/model", "/srv/model"),
])
def test_local_path(uri: str, path: str) -> None:
    assert local_path(uri, "/mnt/kubelm/volumes") == path


def test_the_volumes_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env.VOLUMES_ROOT, raising=False)
    assert local_path("pvc://data/x") == "/mnt/kubelm/volumes/data/x"
    monkeypatch.setenv(env.VOLUMES_ROOT, "/elsewhere")
    assert local_path("pvc://data/x") == "/elsewhere/data/x"
    assert local_path("pvc://data/x", "/given") == "/given/data/x"


def test_claim_and_bad_locations() -> None:
    assert claim_of("pvc://data/x") == "data" and claim_of("/x") is None
    with pytest.raises(LocationError, match="expected pvc://"):
        local_path("relative/path")
