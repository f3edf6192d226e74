"""What `kubelm status` and `kubelm describe` show, as plain data: objects in, rows out (no I/O, no rich).

`-o json|yaml` prints these rows as they are, so scripts read the same figures the table shows.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass
from typing import Any

from .explain import duration, explain


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def age(text: str | None, now: datetime.datetime) -> str:
    """`kubectl`'s short form: 45s, 3m, 2h, 5d."""
    then = parse_time(text)
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _camel(row: Any) -> dict[str, Any]:
    out = {}
    for key, value in asdict(row).items():
        head, *rest = key.split("_")
        out[head + "".join(part.title() for part in rest)] = value
    return out


class _Row:
    def to_dict(self) -> dict[str, Any]:
        return _camel(self)


@dataclass(frozen=True)
class ModelRow(_Row):
    namespace: str
    name: str
    phase: str
    ready: bool
    ready_replicas: int
    desired_replicas: int
    queue_depth: int | None
    unacked: int | None
    dead_lettered: int | None
    cache_hit_ratio: float | None
    """Response-cache hits over lookups; None before the first lookup."""
    last_scaling: str | None
    """"1 -> 3: <why>", the newest entry of the scaling history."""
    last_scaling_time: str | None
    model_digest: str | None
    reason: str


@dataclass(frozen=True)
class TrainingRow(_Row):
    namespace: str
    name: str
    phase: str
    ready: bool
    step: int | None
    total_steps: int | None
    percent: float | None
    loss: float | None
    eval_loss: float | None
    eta_seconds: int | None
    artifact: str | None
    """uri, with the version when known."""
    reason: str


def model_row(obj: dict[str, Any]) -> ModelRow:
    meta, status = obj["metadata"], obj.get("status") or {}
    queue, cache = status.get("queue") or {}, status.get("cache") or {}
    hits, misses = cache.get("hits"), cache.get("misses")
    lookups = (hits or 0) + (misses or 0)
    history = status.get("scalingHistory") or []
    last = history[-1] if history else None
    why = explain(obj)
    return ModelRow(
        namespace=meta.get("namespace", ""), name=meta["name"], phase=status.get("phase") or "Unknown",
        ready=why.ready, ready_replicas=int(status.get("readyReplicas") or 0),
        desired_replicas=int(status.get("desiredReplicas") or 0),
        queue_depth=queue.get("depth"), unacked=queue.get("unacked"), dead_lettered=queue.get("deadLettered"),
        cache_hit_ratio=round(hits / lookups, 4) if lookups and hits is not None else None,
        last_scaling=f"{last['from']} -> {last['to']}: {last['reason']}" if last else None,
        last_scaling_time=last.get("time") if last else None,
        model_digest=(status.get("model") or {}).get("digest"), reason=why.reason)


def training_row(obj: dict[str, Any]) -> TrainingRow:
    meta, status = obj["metadata"], obj.get("status") or {}
    progress, artifact = status.get("progress") or {}, status.get("artifact") or {}
    uri = artifact.get("uri")
    why = explain(obj)
    return TrainingRow(
        namespace=meta.get("namespace", ""), name=meta["name"], phase=status.get("phase") or "Unknown",
        ready=why.ready, step=progress.get("step"), total_steps=progress.get("totalSteps"),
        percent=progress.get("percent"), loss=progress.get("loss"), eval_loss=progress.get("evalLoss"),
        eta_seconds=progress.get("etaSeconds"),
        artifact=f"{uri} (v{artifact['version']})" if uri and artifact.get("version") is not None else uri,
        reason=why.reason)


def rows(models: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> tuple[list[ModelRow], list[TrainingRow]]:
    """The rows of `kubelm status`, by namespace and name."""
    return [model_row(m) for m in _sorted(models)], [training_row(j) for j in _sorted(jobs)]


def overview(models: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`kubelm status -o json|yaml`."""
    model_rows, training_rows = rows(models, jobs)
    return {"languageModels": [r.to_dict() for r in model_rows], "trainingJobs": [r.to_dict() for r in training_rows]}


def _sorted(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(objects, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))


@dataclass(frozen=True)
class Section:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def describe(obj: dict[str, Any], events: list[dict[str, Any]], now: datetime.datetime) -> list[Section]:
    """`kubelm describe`: the explanation, conditions, recent Events and, by kind, progress or scaling and
    revisions. Events come as the API returns them (core/v1 or events.k8s.io fields both read)."""
    status = obj.get("status") or {}
    why = explain(obj)
    sections = [Section("Summary", ("field", "value"), (
        ("kind", str(obj.get("kind"))), ("phase", str(status.get("phase") or "Unknown")),
        ("ready", "yes" if why.ready else "no"), ("why", why.sentence),
        ("generation", f"{obj['metadata'].get('generation')} (observed {status.get('observedGeneration', '-')})")))]
    sections.append(Section("Conditions", ("type", "status", "reason", "age", "message"), tuple(
        (c.get("type", ""), c.get("status", ""), c.get("reason", ""), age(c.get("lastTransitionTime"), now),
         c.get("message", "")) for c in status.get("conditions") or [])))
    if obj.get("kind") == "TrainingJob":
        p, a = status.get("progress") or {}, status.get("artifact") or {}
        sections.append(Section("Training", ("field", "value"), tuple((k, str(v)) for k, v in (
            ("step", f"{p.get('step', '-')}/{p.get('totalSteps', '-')}"), ("epoch", p.get("epoch", "-")),
            ("loss", p.get("loss", "-")), ("eval loss", p.get("evalLoss", "-")),
            ("tokens/s", p.get("tokensPerSecond", "-")), ("eta", duration(p.get("etaSeconds"))),
            ("attempts", status.get("attempts", "-")), ("started", status.get("startTime", "-")),
            ("completed", status.get("completionTime", "-")), ("artifact", a.get("uri", "-")),
            ("version", a.get("version", "-")), ("digest", a.get("digest", "-"))))))
    else:
        q, m = status.get("queue") or {}, status.get("model") or {}
        sections.append(Section("Serving", ("field", "value"), tuple((k, str(v)) for k, v in (
            ("model", m.get("source", "-")), ("digest", m.get("digest", "-")),
            ("endpoint", status.get("endpoint", "-")),
            ("workers", f"{status.get('readyReplicas', 0)} ready / {status.get('desiredReplicas', 0)} desired"),
            ("queue", q.get("name", "-")), ("depth", q.get("depth", "-")), ("unacked", q.get("unacked", "-")),
            ("consumers", q.get("consumers", "-")), ("dead-lettered", q.get("deadLettered", "-"))))))
        sections.append(Section("Scaling history", ("age", "from", "to", "reason"), tuple(
            (age(h.get("time"), now), str(h.get("from")), str(h.get("to")), str(h.get("reason")))
            for h in reversed(status.get("scalingHistory") or []))))
        sections.append(Section("Revisions", ("until", "source", "revision", "digest"), tuple(
            tuple(str(r.get(k, "-")) for k in ("until", "source", "revision", "digest"))
            for r in reversed(status.get("revisions") or []))))
    sections.append(Section("Events", ("age", "type", "reason", "message"), tuple(
        (age(_event_time(e), now), str(e.get("type", "")), str(e.get("reason", "")),
         str(e.get("message") or e.get("note") or "")) for e in sorted(events, key=_event_time)[-10:])))
    return sections


def _event_time(event: dict[str, Any]) -> str:
    """The newest time an Event carries, to the second (core/v1 and events.k8s.io spell it differently)."""
    for value in (event.get("lastTimestamp"), event.get("eventTime"), event.get("firstTimestamp"),
                  (event.get("metadata") or {}).get("creationTimestamp")):
        if value:
            return str(value)[:19] + "Z"
    return ""
