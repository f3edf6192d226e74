"""Tables and progress bars for a terminal (rich), from the plain rows of `summary`."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import summary

PHASE_STYLES = {"Ready": "green", "Succeeded": "green", "Running": "cyan", "Loading": "cyan", "Pending": "yellow",
                "Degraded": "red", "Failed": "red", "Suspended": "dim"}


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _phase(phase: str) -> Text:
    return Text(phase, style=PHASE_STYLES.get(phase, ""))


def models_table(rows: list[summary.ModelRow], namespaces: bool) -> Table:
    table = Table(title="LanguageModels", title_justify="left", box=None, pad_edge=False)
    columns = (["NAMESPACE"] if namespaces else []) + ["NAME", "PHASE", "READY", "QUEUE", "UNACKED", "DEAD",
                                                       "CACHE HIT", "LAST SCALING", "MODEL"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in rows:
        cells: list[RenderableType] = [r.namespace] if namespaces else []
        ratio = "-" if r.cache_hit_ratio is None else f"{r.cache_hit_ratio:.0%}"
        digest = _short_digest(r.model_digest)
        cells += [r.name, _phase(r.phase), f"{r.ready_replicas}/{r.desired_replicas}", _int(r.queue_depth),
                  _int(r.unacked), _int(r.dead_lettered), ratio, r.last_scaling or "-", digest]
        table.add_row(*cells)
    return table


def jobs_table(rows: list[summary.TrainingRow], namespaces: bool) -> Table:
    table = Table(title="TrainingJobs", title_justify="left", box=None, pad_edge=False)
    columns = (["NAMESPACE"] if namespaces else []) + ["NAME", "PHASE", "PROGRESS", "STEP", "LOSS", "EVAL LOSS",
                                                       "ETA", "ARTIFACT"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in rows:
        cells: list[RenderableType] = [r.namespace] if namespaces else []
        total = r.total_steps or 0
        bar: RenderableType = ProgressBar(total=total, completed=r.step or 0, width=20) if total else Text("-")
        step = f"{r.step}/{total}" if total else "-"
        cells += [r.name, _phase(r.phase), bar, step, _number(r.loss), _number(r.eval_loss),
                  summary.duration(r.eta_seconds), r.artifact or "-"]
        table.add_row(*cells)
    return table


def _short_digest(digest: str | None) -> str:
    """sha256:<12 hex> for content digests; a hub model without one is named by its source."""
    if not digest:
        return "-"
    algorithm, _, value = digest.partition(":")
    return f"{algorithm}:{value[:12]}" if algorithm == "sha256" else value


def _int(value: int | None) -> str:
    return "-" if value is None else str(value)


def overview(models: list[summary.ModelRow], jobs: list[summary.TrainingRow], namespaces: bool) -> RenderableType:
    parts: list[RenderableType] = []
    if models:
        parts.append(models_table(models, namespaces))
    if jobs:
        parts += [Text(""), jobs_table(jobs, namespaces)] if parts else [jobs_table(jobs, namespaces)]
    return Group(*parts) if parts else Text("No LanguageModels or TrainingJobs found.")


def sections(found: list[summary.Section]) -> RenderableType:
    parts: list[RenderableType] = []
    for section in found:
        table = Table(title=section.title, title_justify="left", box=None, pad_edge=False,
                      show_header=section.columns != ("field", "value"))
        for column in section.columns:
            table.add_column(column.upper(), overflow="fold")
        for row in section.rows:
            table.add_row(*row)
        if not section.rows:
            table.add_row(*(["<none>"] + [""] * (len(section.columns) - 1)))
        parts += [table, Text("")]
    return Group(*parts)
