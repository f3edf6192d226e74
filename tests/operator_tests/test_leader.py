"""The Lease decision (pure) and the elector's rounds against an in-memory Lease store, without a server."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from typing import Any

import pytest

from kubelm_operator import leader
from kubelm_operator.election import Elector, LeaseLost
from kubelm_operator.kube import ApiError
from kubelm_operator.leader import Action, Decision, LeaseRecord

T0 = dt.datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_no_lease_is_created_with_us_as_holder() -> None:
    assert leader.decide(None, T0, "a", at(1), 15) == Decision(Action.CREATE, LeaseRecord("a", 15, at(1), at(1), 0))


def test_another_holder_is_waited_for_until_its_duration_has_passed_since_we_saw_it() -> None:
    # The record's own renew time (another machine's clock, long ago here) does not count: only when this
    # process saw the record as it is.
    held = LeaseRecord("b", 10, at(-3600), at(-3600), 4)
    assert leader.decide(held, at(0), "a", at(9.5), 15) == Decision(Action.WAIT, None, 0.5)
    assert leader.decide(held, at(0), "a", at(10), 15) == Decision(Action.ACQUIRE,
                                                                    LeaseRecord("a", 15, at(10), at(10), 5))


def test_the_holders_duration_counts_not_ours() -> None:
    held = LeaseRecord("b", 30, at(0), at(0), 0)
    assert leader.decide(held, at(0), "a", at(20), 15).action is Action.WAIT


def test_a_released_lease_is_taken_at_once() -> None:
    free = leader.released(LeaseRecord("b", 15, at(0), at(0), 2), at(1))
    assert free == LeaseRecord("", 1, at(1), at(1), 2)
    assert leader.decide(free, at(1), "a", at(1), 15) == Decision(Action.ACQUIRE,
                                                                   LeaseRecord("a", 15, at(1), at(1), 3))


def test_our_own_lease_is_renewed_keeping_its_acquire_time_and_transitions() -> None:
    ours = LeaseRecord("a", 10, at(0), at(2), 3)
    assert leader.decide(ours, at(2), "a", at(4), 15) == Decision(Action.RENEW, LeaseRecord("a", 15, at(0), at(4), 3))
    # Also after a restart with the same identity (the same pod's container again): it was ours.
    assert leader.decide(ours, at(100), "a", at(100), 15).action is Action.RENEW


def test_the_holder_steps_down_before_anyone_may_take_over() -> None:
    assert leader.renew_deadline(15) == 10
    assert not leader.must_step_down(at(0), at(9.9), 15)
    assert leader.must_step_down(at(0), at(10), 15)


def test_identity_is_the_pod_name_or_host_and_pid() -> None:
    assert leader.identity("kubelm-operator-7d9f-x2", "host", 7) == "kubelm-operator-7d9f-x2"
    assert leader.identity(None, "host", 7) == "host-7"


def test_lease_object_and_record_round_trip() -> None:
    record = LeaseRecord("a", 15, at(0), at(2), 3)
    obj = leader.lease("kubelm-operator", "kubelm-system", record, "42")
    assert obj == {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kubelm-operator", "namespace": "kubelm-system", "resourceVersion": "42",
                     "labels": {"app.kubernetes.io/part-of": "kubelm"}},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15, "leaseTransitions": 3,
                 "acquireTime": "2025-01-02T03:04:05.123456Z", "renewTime": "2025-01-02T03:04:07.123456Z"}}
    assert leader.record_of(obj) == record
    free = leader.lease("kubelm-operator", "kubelm-system", leader.released(record, at(5)))
    assert "holderIdentity" not in free["spec"] and "resourceVersion" not in free["metadata"]
    assert leader.record_of(free).holder == ""
    # What other writers leave: whole seconds, missing fields.
    assert leader.record_of({"spec": {"holderIdentity": "b", "renewTime": "2025-01-02T03:04:05Z"}}) == \
        LeaseRecord("b", 0, None, T0.replace(microsecond=0), 0)


class Store:
    """The API server's part in the election: one Lease, resourceVersion checked on replace."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.failing: set[str] = set()
        """Identities whose requests fail (a partitioned process)."""

    def client(self, who: str) -> Client:
        return Client(self, who)


class Client:
    def __init__(self, store: Store, who: str):
        self.store, self.who = store, who

    def _check(self) -> None:
        if self.who in self.store.failing:
            raise OSError("connection refused")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._check()
        found = copy.deepcopy(self.store.lease)
        await asyncio.sleep(0)  # lets another elector read the same version before either writes
        return found

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        self._check()
        if self.store.lease is not None:
            return None
        return self._write(obj)

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._check()
        assert self.store.lease is not None
        if obj["metadata"].get("resourceVersion") != self.store.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified", "PUT", "/leases/x")
        return self._write(obj)

    def _write(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.store.version += 1
        written = copy.deepcopy(obj)
        written["metadata"]["resourceVersion"] = str(self.store.version)
        self.store.lease = written
        return copy.deepcopy(written)


def elector(store: Store, who: str, duration: int = 1, retry: float = 0.02) -> Elector:
    return Elector(store.client(who), "ns", "lease", who, duration, retry)  # type: ignore[arg-type]


def holder(store: Store) -> str | None:
    return None if store.lease is None else store.lease["spec"].get("holderIdentity")


def test_of_two_electors_exactly_one_leads_and_the_other_takes_over_when_it_releases() -> None:
    async def scenario() -> None:
        store = Store()
        a, b = elector(store, "a"), elector(store, "b")
        stop = asyncio.Event()
        assert await a.acquire(stop)
        waiting = asyncio.create_task(b.acquire(stop))
        holding = asyncio.create_task(a.hold())
        await asyncio.sleep(0.3)  # many rounds of both
        assert not waiting.done() and holder(store) == "a" and b.report()["leaderElection"] == {
            "role": "standby", "identity": "b", "holder": "a", "lease": "ns/lease"}
        holding.cancel()
        await a.release()
        assert holder(store) is None
        assert await asyncio.wait_for(waiting, timeout=0.5)  # well before the 1 s lease could expire
        assert holder(store) == "b" and store.lease is not None and store.lease["spec"]["leaseTransitions"] == 1
    asyncio.run(scenario())


def test_a_killed_leader_is_replaced_after_the_lease_duration() -> None:
    async def scenario() -> None:
        store = Store()
        a, b = elector(store, "a"), elector(store, "b")
        stop = asyncio.Event()
        assert await a.acquire(stop)  # and then never renews: killed
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(b.acquire(stop), timeout=3)
        assert asyncio.get_running_loop().time() - started >= 0.9
        assert holder(store) == "b"
    asyncio.run(scenario())


def test_a_leader_that_cannot_renew_steps_down_before_the_standby_takes_over() -> None:
    async def scenario() -> None:
        store = Store()
        a, b = elector(store, "a", retry=0.05), elector(store, "b", retry=0.05)
        stop = asyncio.Event()
        assert await a.acquire(stop)
        waiting = asyncio.create_task(b.acquire(stop))
        store.failing.add("a")
        with pytest.raises(LeaseLost, match=r"not renewed for 0\.666667 s"):
            await asyncio.wait_for(a.hold(), timeout=3)
        assert not a.leading and not waiting.done()  # the old leader stopped first
        assert await asyncio.wait_for(waiting, timeout=3)
    asyncio.run(scenario())


def test_a_leader_that_sees_another_holder_stops_at_once() -> None:
    async def scenario() -> None:
        store = Store()
        a = elector(store, "a", duration=15, retry=0.02)
        assert await a.acquire(asyncio.Event())
        assert store.lease is not None
        store.lease["spec"]["holderIdentity"] = "c"  # written by hand, or a process with a different clock
        store.lease["metadata"]["resourceVersion"] = "99"
        with pytest.raises(LeaseLost, match="Lease ns/lease is now held by c"):
            await asyncio.wait_for(a.hold(), timeout=1)
        await a.release()  # no longer ours: left as it is
        assert holder(store) == "c"
    asyncio.run(scenario())


@pytest.mark.parametrize("released", [False, True], ids=["no-lease", "released-lease"])
def test_two_electors_racing_for_a_free_lease_never_both_win(released: bool) -> None:
    async def scenario() -> None:
        store = Store()
        if released:
            store.client("x")._write(leader.lease("lease", "ns", leader.released(LeaseRecord("x", 15), T0)))
        a, b = elector(store, "a"), elector(store, "b")
        won = await asyncio.gather(a._try(), b._try())
        assert won == [True, False]  # both read the same version; the second write is refused
        assert holder(store) == "a" and store.version == (2 if released else 1)
    asyncio.run(scenario())


def test_a_standby_stops_waiting_when_asked() -> None:
    async def scenario() -> None:
        store = Store()
        a, b = elector(store, "a", duration=15), elector(store, "b", duration=15)
        stop = asyncio.Event()
        assert await a.acquire(stop)
        waiting = asyncio.create_task(b.acquire(stop))
        await asyncio.sleep(0.1)
        stop.set()
        assert await asyncio.wait_for(waiting, timeout=1) is False
        assert holder(store) == "a"
    asyncio.run(scenario())
