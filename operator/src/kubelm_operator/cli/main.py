"""`kubelm`: status, describe, explain, generate and logs for TrainingJobs and LanguageModels.

Exit codes (docs/cli.md): 0 done (explain: Ready), 1 not Ready / training failed, 2 usage, 3 cluster
unreachable or no kubeconfig, 4 access denied, 5 kubelm API not installed, 6 object not found,
7 a request failed (generate: an error reply, a timeout, a refused call), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import datetime
import functools
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import click
import yaml
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kubelm_contract import protocol, queues

from .. import broker
from ..builders import common, training
from ..spec import parse_languagemodel
from . import interrupt, render, summary
from .cluster import NOT_READY, REQUEST_FAILED, CliError, Cluster
from .explain import LANGUAGE_MODEL, TRAINING_JOB, explain

KIND_NAMES = {"lm": LANGUAGE_MODEL, "languagemodel": LANGUAGE_MODEL, "languagemodels": LANGUAGE_MODEL,
              "tj": TRAINING_JOB, "trainingjob": TRAINING_JOB, "trainingjobs": TRAINING_JOB}
TERMINAL = ("Succeeded", "Failed")


class State:
    def __init__(self, kubeconfig: str | None, context: str | None):
        self.kubeconfig, self.context = kubeconfig, context
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            self._cluster = Cluster.connect(self.kubeconfig, self.context)
        return self._cluster


def _errors(command: Callable[..., int | None]) -> Callable[..., None]:
    """One line on stderr and the documented exit code, never a traceback, for what users run into."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            code = command(*args, **kwargs) or 0
        except CliError as e:
            click.echo(f"error: {e}", err=True)
            code = e.exit_code
        except KeyboardInterrupt:
            code = interrupt.INTERRUPTED
        interrupt.leave(code)
    return run


def _target(text: str) -> tuple[str, str]:
    kind, _, name = text.partition("/")
    if not name or kind.lower() not in KIND_NAMES:
        raise click.BadParameter(f"{text!r}: expected lm/NAME or tj/NAME", param_hint="TARGET")
    return KIND_NAMES[kind.lower()], name


def _dump(data: Any, output: str) -> None:
    click.echo(json.dumps(data, indent=2) if output == "json" else yaml.safe_dump(data, sort_keys=False), nl=False)
    if output == "json":
        click.echo()


namespace_option = click.option("-n", "--namespace", help="Namespace (default: the kubeconfig context's).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--kubeconfig", help="Path to the kubeconfig file (default: $KUBECONFIG, merged as kubectl does, "
                                   "else ~/.kube/config).")
@click.option("--context", help="The kubeconfig context to use.")
@click.version_option(package_name="kubelm-operator")
@click.pass_context
def cli(ctx: click.Context, kubeconfig: str | None, context: str | None) -> None:
    """Training and serving language models on Kubernetes, at a glance."""
    ctx.obj = State(kubeconfig, context)


@cli.command()
@namespace_option
@click.option("-A", "--all-namespaces", is_flag=True, help="Every namespace.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table")
@click.option("-w", "--watch", is_flag=True, help="Refresh in place until interrupted.")
@click.option("--interval", type=click.FloatRange(0.5), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.pass_obj
@_errors
def status(state: State, namespace: str | None, all_namespaces: bool, output: str, watch: bool,
           interval: float) -> int:
    """LanguageModels and TrainingJobs: phase, replicas, queue, cache, training progress."""
    cluster = state.cluster
    where = None if all_namespaces else namespace or cluster.namespace

    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return cluster.objects(LANGUAGE_MODEL, where), cluster.objects(TRAINING_JOB, where)

    if output != "table":
        _dump(summary.overview(*read()), output)
        return 0

    def screen() -> Any:
        return render.overview(*summary.rows(*read()), namespaces=where is None)

    console = Console()
    if not watch:
        console.print(screen())
        return 0
    live = Live(screen(), console=console, auto_refresh=False)
    try:
        live.start(refresh=True)
        while True:
            time.sleep(interval)
            live.update(screen(), refresh=True)
    except KeyboardInterrupt:  # the way out of --watch: not a failure
        return 0
    finally:
        # Not `with Live`: Ctrl-C while the first screen is written would skip its exit, cursor still hidden.
        live.stop()


@cli.command()
@click.argument("target")
@namespace_option
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table")
@click.pass_obj
@_errors
def describe(state: State, target: str, namespace: str | None, output: str) -> int:
    """Conditions, recent Events, progress or scaling history and revisions of lm/NAME or tj/NAME."""
    kind, name = _target(target)
    cluster = state.cluster
    obj = cluster.get(kind, namespace or cluster.namespace, name)
    events = cluster.events(obj["metadata"]["namespace"], obj["metadata"]["uid"])
    found = summary.describe(obj, events, datetime.datetime.now(datetime.UTC))
    if output != "table":
        _dump({s.title: [dict(zip(s.columns, row, strict=True)) for row in s.rows] for s in found}, output)
        return 0
    Console().print(render.sections(found))
    return 0


@cli.command("explain")
@click.argument("target")
@namespace_option
@click.pass_obj
@_errors
def explain_command(state: State, target: str, namespace: str | None) -> int:
    """One sentence on why lm/NAME or tj/NAME is not Ready and what to do. Exit code 0 when Ready, else 1."""
    kind, name = _target(target)
    cluster = state.cluster
    why = explain(cluster.get(kind, namespace or cluster.namespace, name))
    click.echo(why.sentence)
    return 0 if why.ready else NOT_READY


@cli.command()
@click.argument("name")
@click.argument("prompt")
@namespace_option
@click.option("--max-tokens", type=click.IntRange(1), help="New tokens at most (default: the model's setting).")
@click.option("--temperature", type=click.FloatRange(0), help="0 for greedy (default: the model's setting).")
@click.option("--seed", type=int, help="Reproducible sampling.")
@click.option("--via", type=click.Choice(["auto", "gateway", "queue"]), default="auto", show_default=True,
              help="auto: the gateway when the model has one, else the queue.")
@click.option("--amqp-url", envvar="KUBELM_AMQP_URL", help="RabbitMQ URL for --via queue (default: $KUBELM_AMQP_URL).")
@click.option("--api-key", envvar="KUBELM_API_KEY",
              help="The gateway's API key (default: $KUBELM_API_KEY, else read from the model's "
                   "spec.gateway.authSecretRef Secret when it has one).")
@click.option("--timeout", type=click.FloatRange(1), default=120.0, show_default=True, help="Seconds to wait.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_obj
@_errors
def generate(state: State, name: str, prompt: str, namespace: str | None, max_tokens: int | None,
             temperature: float | None, seed: int | None, via: str, amqp_url: str | None, api_key: str | None,
             timeout: float, output: str) -> int:
    """Complete PROMPT with LanguageModel NAME, through its gateway or straight through its queue."""
    cluster = state.cluster
    namespace = namespace or cluster.namespace
    model = cluster.get(LANGUAGE_MODEL, namespace, name)
    endpoint = (model.get("status") or {}).get("endpoint")
    if via == "gateway" and not endpoint:
        raise CliError(f"LanguageModel {namespace}/{name} has no gateway (spec.gateway.enabled is false): "
                       "use --via queue", REQUEST_FAILED)
    if via == "gateway" or (via == "auto" and endpoint):
        key = api_key or _gateway_key(cluster, model)
        answer = _through_gateway(cluster, namespace, name, str(endpoint), prompt, max_tokens, temperature, seed,
                                  timeout, key)
        text = answer["choices"][0]["text"]
    else:
        answer, text = _through_queue(model, amqp_url, prompt, max_tokens, temperature, seed, timeout)
    if output == "json":
        _dump(answer, "json")
    else:
        click.echo(text)
    return 0


def _gateway_key(cluster: Cluster, model: dict[str, Any]) -> str | None:
    """The API key of a gateway that wants one, from the Secret its LanguageModel names."""
    # Read as it is, not through the spec's parser, which would refuse fields of a newer API version.
    reference = ((model.get("spec") or {}).get("gateway") or {}).get("authSecretRef")
    if not isinstance(reference, dict) or not reference.get("name"):
        return None
    meta = model["metadata"]
    try:
        return cluster.secret_value(meta["namespace"], str(reference["name"]), str(reference.get("key") or "token"))
    except CliError as e:
        raise CliError(f"the gateway of LanguageModel {meta['namespace']}/{meta['name']} wants an API key, and "
                       f"reading it failed ({e}): pass --api-key or set KUBELM_API_KEY", e.exit_code) from e


def _through_gateway(cluster: Cluster, namespace: str, name: str, endpoint: str, prompt: str, max_tokens: int | None,
                     temperature: float | None, seed: int | None, timeout: float,
                     api_key: str | None) -> dict[str, Any]:
    url = urlsplit(endpoint)
    service = (url.hostname or "").split(".")[0]
    body: dict[str, Any] = {"model": name, "prompt": prompt}
    for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if value is not None:
            body[key] = value
    # Azure OpenAI's header: the API server's proxy keeps Authorization for itself.
    headers = {"api-key": api_key} if api_key else None
    return cluster.post_to_service(namespace, service, url.port or 80, f"{url.path.rstrip('/')}/completions", body,
                                   timeout, headers)


def _through_queue(model: dict[str, Any], amqp_url: str | None, prompt: str, max_tokens: int | None,
                   temperature: float | None, seed: int | None, timeout: float) -> tuple[dict[str, Any], str]:
    if not amqp_url:
        raise CliError("--via queue needs RabbitMQ's URL: pass --amqp-url or set KUBELM_AMQP_URL", REQUEST_FAILED)
    meta = model["metadata"]
    decoding = parse_languagemodel(model.get("spec") or {}).generation.decoding()
    chosen: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": temperature, "seed": seed}
    decoding = replace(decoding, **{k: v for k, v in chosen.items() if v is not None})
    request = protocol.Request(id=f"cli-{uuid.uuid4().hex}", prompts=(prompt,), decoding=decoding,
                               deadline=time.time() + timeout, model=meta["name"])
    try:
        raw = broker.request(amqp_url, queues.request_queue(meta["namespace"], meta["name"]), request.to_json(),
                             request.id, timeout)
    except (broker.BrokerUnavailable, TimeoutError) as e:
        raise CliError(str(e), REQUEST_FAILED) from e
    reply = protocol.Reply.from_json(raw)
    if reply.error:
        raise CliError(f"the model refused the request: {reply.error[0]}: {reply.error[1]}", REQUEST_FAILED)
    return json.loads(raw), reply.choices[0].text


@cli.command()
@click.argument("target")
@namespace_option
@click.option("--follow/--no-follow", "-f", default=True, show_default=True,
              help="Follow until the job ends, with a live progress bar.")
@click.pass_obj
@_errors
def logs(state: State, target: str, namespace: str | None, follow: bool) -> int:
    """The trainer's log of tj/NAME (rank 0), followed with a live progress bar until the job ends.
    Exit code 0 when the job succeeded (or without --follow), 1 when it failed."""
    kind, name = _target(target)
    if kind != TRAINING_JOB:
        raise click.BadParameter("logs follow a TrainingJob: tj/NAME", param_hint="TARGET")
    cluster = state.cluster
    namespace = namespace or cluster.namespace
    job = cluster.get(TRAINING_JOB, namespace, name)
    console = Console(stderr=True)
    if not follow:
        pod = _trainer_pod(cluster, job)
        if pod is None:
            raise CliError(f"TrainingJob {namespace}/{name} has no trainer pod yet", REQUEST_FAILED)
        for line in cluster.follow_log(namespace, pod, training.CONTAINER, follow=False):
            click.echo(line)
        return 0
    return _follow(cluster, job, console)


def _trainer_pod(cluster: Cluster, job: dict[str, Any]) -> str | None:
    """The newest started pod of rank 0 (a retried job has several)."""
    meta = job["metadata"]
    owner = common.Owner(TRAINING_JOB, meta["namespace"], meta["name"], meta["uid"])
    selector = ",".join(f"{k}={v}" for k, v in common.labels(owner, training.COMPONENT).items())
    pods = [p for p in cluster.pods(meta["namespace"], selector)
            if (p["metadata"].get("annotations") or {}).get("batch.kubernetes.io/job-completion-index", "0") == "0"
            and any("running" in (c.get("state") or {}) or "terminated" in (c.get("state") or {})
                    for c in (p.get("status") or {}).get("containerStatuses") or [])]
    pods.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""))
    return pods[-1]["metadata"]["name"] if pods else None


def _lines(cluster: Cluster, namespace: str, pod: str, out: queue.Queue[str | None]) -> None:
    try:
        for line in cluster.follow_log(namespace, pod, training.CONTAINER):
            out.put(line)
    except CliError as e:
        out.put(f"[logs of {pod} ended: {e}]")
    finally:
        out.put(None)


def _follow(cluster: Cluster, job: dict[str, Any], console: Console) -> int:
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[loss]}"), console=console, transient=False)
    task = progress.add_task(f"{name}: waiting for the trainer", total=None, loss="")
    followed: set[str] = set()
    lines: queue.Queue[str | None] = queue.Queue()
    streaming = False
    with progress:
        while True:
            job = cluster.get(TRAINING_JOB, namespace, name)
            status = job.get("status") or {}
            done = status.get("phase") in TERMINAL
            p = status.get("progress") or {}
            loss = f"loss {p['loss']:.4g}" if p.get("loss") is not None else ""
            progress.update(task, description=f"{name}: {status.get('phase', 'Pending')}", total=p.get("totalSteps"),
                            completed=p.get("step") or 0, loss=loss)
            if not streaming:
                pod = _trainer_pod(cluster, job)
                if pod is not None and pod not in followed:
                    followed.add(pod)
                    streaming = True
                    threading.Thread(target=_lines, args=(cluster, namespace, pod, lines), daemon=True).start()
            for line in _drain(lines, timeout=1.0):
                if line is None:
                    streaming = False
                else:
                    click.echo(line)
            if done and not streaming:
                break
    why = explain(job)
    console.print(why.sentence)
    return 0 if status.get("phase") == "Succeeded" else NOT_READY


def _drain(lines: queue.Queue[str | None], timeout: float) -> Iterator[str | None]:
    """What arrived within the timeout; the first wait is the loop's pace."""
    try:
        yield lines.get(timeout=timeout)
        while True:
            yield lines.get_nowait()
    except queue.Empty:
        return


def main() -> None:
    interrupt.install()
    cli()
