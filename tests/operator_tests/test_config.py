from __future__ import annotations

import pytest

from kubelm_operator.config import DEFAULT_RUNTIME_IMAGE, ConfigError, OperatorConfig, from_environ


def test_defaults() -> None:
    assert from_environ({}) == OperatorConfig()
    assert OperatorConfig().runtime_image == DEFAULT_RUNTIME_IMAGE


def test_every_setting_is_read() -> None:
    config = from_environ({
        "KUBELM_RUNTIME_IMAGE": "registry.example/kubelm/runtime:1",
        "KUBELM_REDIS_URL": "redis://r:6379/0", "KUBELM_AMQP_URL": "amqp://a", "KUBELM_RABBITMQ_API_URL": "http://m",
        "KUBELM_NAMESPACES": "team-a, team-b ,", "KUBELM_LOG_FORMAT": "json", "KUBELM_LOG_LEVEL": "debug",
        "KUBELM_METRICS_PORT": "0", "KUBELM_HEALTH_PORT": "9000", "KUBELM_PROGRESS_INTERVAL_SECONDS": "2.5",
        "KUBELM_AUTOSCALE_INTERVAL_SECONDS": "0.5",
        "KUBELM_WATCH_SERVER_TIMEOUT_SECONDS": "60", "KUBELM_WATCH_CLIENT_TIMEOUT_SECONDS": "90",
        "KUBELM_REQUEST_TIMEOUT_SECONDS": "5", "KUBELM_PEERING": "kubelm",
    })
    assert config == OperatorConfig(
        runtime_image="registry.example/kubelm/runtime:1", redis_url="redis://r:6379/0", amqp_url="amqp://a",
        rabbitmq_api_url="http://m", namespaces=("team-a", "team-b"), log_format="json", log_level="DEBUG",
        metrics_port=0, health_port=9000, progress_interval_seconds=2.5, autoscale_interval_seconds=0.5,
        watch_server_timeout_seconds=60,
        watch_client_timeout_seconds=90, request_timeout_seconds=5.0, peering="kubelm")


def test_leader_election_settings() -> None:
    config = from_environ({"KUBELM_LEADER_ELECTION": "True", "KUBELM_LEASE_NAME": "ops",
                           "KUBELM_LEASE_DURATION_SECONDS": "9", "KUBELM_LEASE_RENEW_SECONDS": "1.5",
                           "POD_NAME": "kubelm-operator-5f-x", "POD_NAMESPACE": "kubelm-system"})
    assert config == OperatorConfig(leader_election=True, lease_name="ops", lease_duration_seconds=9,
                                    lease_renew_seconds=1.5, pod_name="kubelm-operator-5f-x",
                                    lease_namespace="kubelm-system")
    assert from_environ({"KUBELM_LEADER_ELECTION": "false"}) == OperatorConfig()


@pytest.mark.parametrize(("environ", "message"), [
    ({"KUBELM_LEADER_ELECTION": "yes"}, "KUBELM_LEADER_ELECTION='yes': expected true or false"),
    ({"KUBELM_LEADER_ELECTION": "true", "KUBELM_PEERING": "kubelm"},
     "KUBELM_PEERING and KUBELM_LEADER_ELECTION=true exclude each other"),
    ({"KUBELM_LEASE_DURATION_SECONDS": "5"},
     "KUBELM_LEASE_RENEW_SECONDS=2 must be at most a third of KUBELM_LEASE_DURATION_SECONDS=5"),
    ({"KUBELM_LEASE_RENEW_SECONDS": "0"}, "KUBELM_LEASE_RENEW_SECONDS must be more than 0"),
    ({"KUBELM_LOG_FORMAT": "xml"}, "KUBELM_LOG_FORMAT='xml': expected text or json"),
    ({"KUBELM_METRICS_PORT": "eighty"}, "KUBELM_METRICS_PORT='eighty' is not a number"),
    ({"KUBELM_PROGRESS_INTERVAL_SECONDS": "-1"}, "must not be negative"),
    ({"KUBELM_PROGRESS_INTERVAL_SECONDS": "0"}, "KUBELM_PROGRESS_INTERVAL_SECONDS must be more than 0"),
])
def test_bad_settings_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_environ(environ)


def test_operator_refuses_to_start_on_a_bad_setting(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from kubelm_operator.main import main

    monkeypatch.setenv("KUBELM_HEALTH_PORT", "not-a-port")
    assert main() == 2
    assert "kubelm-operator: KUBELM_HEALTH_PORT='not-a-port' is not a number" in capsys.readouterr().err


def test_leader_election_outside_a_pod_needs_the_namespace(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from kubelm_operator import main

    monkeypatch.setattr(main, "SERVICE_ACCOUNT_NAMESPACE", main.Path("/nonexistent/namespace"))
    monkeypatch.setenv("KUBELM_LEADER_ELECTION", "true")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert main.main() == 2
    assert "KUBELM_LEADER_ELECTION=true needs the operator's namespace: set POD_NAMESPACE" in capsys.readouterr().err


def test_kopf_run_module_registers_the_same_handlers_on_kopfs_registry() -> None:
    import kopf

    import kubelm_operator.kopf_entry  # noqa: F401 (registers on import)

    registry = kopf.get_default_registry()
    ids = {h.id for h in registry._changing.get_all_handlers()}  # kopf has no public listing of handlers
    assert {"trainingjob", "trainingjob-cleanup"} <= ids
