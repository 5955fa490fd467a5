"""The kill switch fails closed, and API server outages are told apart from run failures."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from deployment_cleanup import kube
from deployment_cleanup.controller import Controller
from deployment_cleanup.kube import KillSwitch, KubeApi, KubeUnavailable, unavailable
from tests.support.operator import cleanup_resource, cluster_spec


class _Flag:
    """Stands in for KubeApi.read_flag only: the switch's own logic is under test."""

    def __init__(self) -> None:
        self.value: bool | Exception = False

    def read_flag(self, namespace: str, name: str, key: str) -> bool:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _switch(clock: _Clock) -> KillSwitch:
    return KillSwitch("ops", "deployment-cleanup-kill-switch", max_age=30, clock=clock)


def _refresh(switch: KillSwitch, flag: _Flag) -> None:
    switch.refresh(flag)  # type: ignore[arg-type]  # duck-typed: read_flag only


def test_the_switch_is_on_until_it_is_first_read() -> None:
    switch = _switch(_Clock())
    assert switch.on
    assert switch.reason() == "kill switch: not read yet"


def test_an_unreadable_switch_counts_as_on() -> None:
    clock, flag = _Clock(), _Flag()
    switch = _switch(clock)
    _refresh(switch, flag)
    assert not switch.on
    flag.value = urllib3.exceptions.MaxRetryError(None, "/api")  # type: ignore[arg-type]
    _refresh(switch, flag)
    assert switch.on
    assert "cannot be read (MaxRetryError)" in (switch.reason() or "")


def test_a_switch_not_read_for_longer_than_max_age_counts_as_on() -> None:
    # A poller stuck in a call that never returns must not leave the switch off.
    clock, flag = _Clock(), _Flag()
    switch = _switch(clock)
    _refresh(switch, flag)
    clock.now += 30
    assert not switch.on  # exactly at the limit: still fresh
    clock.now += 1
    assert switch.on
    assert "last read 31s ago" in (switch.reason() or "")
    _refresh(switch, flag)
    assert not switch.on


def test_a_switch_read_as_on_stays_on_whatever_its_age() -> None:
    clock, flag = _Clock(), _Flag()
    flag.value = True
    switch = _switch(clock)
    _refresh(switch, flag)
    clock.now += 3600
    assert switch.on
    assert "has enabled=true" in (switch.reason() or "")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(urllib3.exceptions.MaxRetryError(None, "/api"), True, id="refused"),  # type: ignore[arg-type]
        pytest.param(urllib3.exceptions.ReadTimeoutError(None, "/api", "read"), True, id="timeout"),  # type: ignore[arg-type]
        pytest.param(urllib3.exceptions.ProtocolError("reset"), True, id="reset"),
        pytest.param(ConnectionResetError(), True, id="socket-reset"),
        pytest.param(ApiException(status=503), True, id="503"),
        pytest.param(ApiException(status=500), True, id="500"),
        pytest.param(ApiException(status=429), True, id="429"),
        pytest.param(KubeUnavailable("away"), True, id="ours"),
        pytest.param(ApiException(status=404), False, id="404"),
        pytest.param(ApiException(status=403), False, id="403"),
        pytest.param(ApiException(status=422), False, id="422"),
        pytest.param(ValueError("bad spec"), False, id="not-kube"),
    ],
)
def test_unavailable_means_the_api_server_is_away_not_that_the_run_is_wrong(
    error: Exception, expected: bool
) -> None:
    assert unavailable(error) is expected


def test_a_silent_api_server_cannot_hang_a_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real socket on loopback that accepts and never answers (a half-open API server).
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", (0.5, 0.5))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.getsockname()[1]}"
        configuration.retries = 0
        api = KubeApi(client.ApiClient(configuration))
        started = time.monotonic()
        with pytest.raises(urllib3.exceptions.HTTPError) as caught:
            api.patch_status("ns", "nightly", {"observedGeneration": 1})
        assert time.monotonic() - started < 5
        assert unavailable(caught.value)
        with pytest.raises(urllib3.exceptions.HTTPError):
            api.read_flag("ns", "kill-switch", "enabled")
        api.api.close()


def test_a_tick_while_the_api_server_is_down_records_no_failure() -> None:
    # The API server is away (nothing listens on the port): the tick must raise
    # KubeUnavailable for kopf to retry at the next tick, not record a Failed run
    # whose backoff would outlast the outage.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = 0
    api = KubeApi(client.ApiClient(configuration))
    switch = KillSwitch("ops", "kill-switch")
    controller = Controller(api, switch, "replica-a", lambda: datetime(2026, 12, 4, tzinfo=UTC))
    body = cleanup_resource(cluster_spec()) | {}
    body["metadata"] |= {"namespace": "ns", "uid": "u-1", "generation": 1}
    posted: list[tuple[str, str, str]] = []
    with pytest.raises(KubeUnavailable, match="Secret ns/builds-db"):
        asyncio.run(controller.tick(body, lambda *event: posted.append(event)))
    assert posted == []
    api.api.close()
