"""The fault-injecting routing server does, over a real loopback socket, what it claims."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support.routing_server import DEFAULT_PATH, RoutingServer

IDS = ["b1", "b2", "b3", "b4"]
ROUTED = {"b1", "b3"}
TIMEOUT = httpx.Timeout(5.0)
# Every httpx.Client would otherwise load the CA bundle (~0.1 s); these tests speak plain HTTP.
TLS = ssl.create_default_context()
NORMAL_RESULTS = [
    {"id": "b1", "routed": True},
    {"id": "b2", "routed": False},
    {"id": "b3", "routed": True},
    {"id": "b4", "routed": False},
]


@pytest.fixture
def server() -> Iterator[RoutingServer]:
    with RoutingServer(routed=ROUTED) as routing:
        yield routing
    assert routing.errors == []


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT, verify=TLS) as http:
        yield http


def lookup(
    client: httpx.Client,
    server: RoutingServer,
    ids: list[str],
    *,
    headers: dict[str, str] | None = None,
    timeout: httpx.Timeout = TIMEOUT,
) -> httpx.Response:
    return client.post(server.url, json={"ids": ids}, headers=headers, timeout=timeout)


def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def connection_threads(server: RoutingServer) -> list[threading.Thread]:
    name = f"routing-server-{server.port}-conn"
    return [thread for thread in threading.enumerate() if thread.name == name]


# -- the contract ----------------------------------------------------------------------------


def test_answers_every_requested_id_once_with_its_routing_state(
    server: RoutingServer, client: httpx.Client
) -> None:
    response = lookup(client, server, IDS, headers={"X-Trace": "t1"})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"results": NORMAL_RESULTS}
    assert server.url == f"http://127.0.0.1:{server.port}{DEFAULT_PATH}"
    (recorded,) = server.requests
    assert recorded.path == DEFAULT_PATH
    assert recorded.ids == tuple(IDS)
    assert recorded.kind == "ok"
    assert recorded.headers["x-trace"] == "t1"
    assert json.loads(recorded.body) == {"ids": IDS}
    assert server.request_count == 1


def test_any_path_is_served_and_recorded(server: RoutingServer, client: httpx.Client) -> None:
    response = client.post(f"http://127.0.0.1:{server.port}/other/path", json={"ids": ["b1"]})

    assert response.json() == {"results": [{"id": "b1", "routed": True}]}
    assert server.requests[0].path == "/other/path"


def test_set_routed_replaces_the_routed_set(server: RoutingServer, client: httpx.Client) -> None:
    server.set_routed(["b2"])

    assert lookup(client, server, ["b1", "b2"]).json() == {
        "results": [{"id": "b1", "routed": False}, {"id": "b2", "routed": True}]
    }


def test_repeated_ids_are_answered_once_but_recorded_as_sent(
    server: RoutingServer, client: httpx.Client
) -> None:
    assert lookup(client, server, ["b1", "b1"]).json() == {"results": [NORMAL_RESULTS[0]]}
    assert server.requests[0].ids == ("b1", "b1")


def test_empty_batch_gets_empty_results(server: RoutingServer, client: httpx.Client) -> None:
    assert lookup(client, server, []).json() == {"results": []}


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"ids": "b1"}', b'{"ids": [1]}', b'{"build_ids": []}']
)
def test_body_outside_the_contract_gets_400(
    server: RoutingServer, client: httpx.Client, body: bytes
) -> None:
    response = client.post(server.url, content=body)

    assert response.status_code == 400
    assert server.requests[0].kind == "bad_request"


def test_connections_are_kept_alive_between_requests(
    server: RoutingServer, client: httpx.Client
) -> None:
    first = lookup(client, server, ["b1"])
    second = lookup(client, server, ["b2"])

    def local_address(response: httpx.Response) -> object:
        return response.extensions["network_stream"].get_extra_info("client_addr")

    assert local_address(first) == local_address(second)
    assert server.request_count == 2


def test_latency_delays_every_answer(server: RoutingServer, client: httpx.Client) -> None:
    server.latency = 0.2
    started = time.monotonic()

    assert lookup(client, server, ["b1"]).status_code == 200
    assert time.monotonic() - started >= 0.2


# -- authentication --------------------------------------------------------------------------


def test_token_is_required_as_a_bearer_authorization_header(client: httpx.Client) -> None:
    with RoutingServer(token="s3cret", routed={"b1"}) as server:
        missing = lookup(client, server, ["b1"])
        wrong = lookup(client, server, ["b1"], headers={"Authorization": "Bearer nope"})
        unprefixed = lookup(client, server, ["b1"], headers={"Authorization": "s3cret"})
        right = lookup(client, server, ["b1"], headers={"Authorization": "Bearer s3cret"})

    assert [r.status_code for r in (missing, wrong, unprefixed, right)] == [401, 401, 401, 200]
    assert right.json() == {"results": [{"id": "b1", "routed": True}]}
    assert [r.kind for r in server.requests] == ["unauthorized"] * 3 + ["ok"]


def test_token_can_travel_in_another_header(client: httpx.Client) -> None:
    with RoutingServer(token="k", auth_header="X-Api-Key", auth_prefix="") as server:
        bearer = lookup(client, server, ["b1"], headers={"Authorization": "Bearer k"})
        custom = lookup(client, server, ["b1"], headers={"x-api-key": "k"})

    assert (bearer.status_code, custom.status_code) == (401, 200)


def test_unauthorized_requests_do_not_use_up_faults(client: httpx.Client) -> None:
    with RoutingServer(token="t") as server:
        server.add_fault("status", code=500, times=1)
        assert lookup(client, server, ["b1"]).status_code == 401
        authorized = {"Authorization": "Bearer t"}
        assert lookup(client, server, ["b1"], headers=authorized).status_code == 500
        assert lookup(client, server, ["b1"], headers=authorized).status_code == 200


# -- transport faults ------------------------------------------------------------------------


def test_status_fault_sends_the_code_retry_after_and_a_json_error(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("status", code=503, retry_after=2, times=1)
    server.add_fault("status", code=429, retry_after=0.5, times=1)
    server.add_fault("status", code=502, body="upstream down", times=1)

    unavailable = lookup(client, server, IDS)
    throttled = lookup(client, server, IDS)
    bad_gateway = lookup(client, server, IDS)

    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after"] == "2"
    assert "error" in unavailable.json()
    assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "0.5")
    assert (bad_gateway.status_code, bad_gateway.text) == (502, "upstream down")
    assert "retry-after" not in bad_gateway.headers
    assert [r.kind for r in server.requests] == ["status"] * 3


def test_reset_fault_aborts_the_connection_with_rst(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("reset", times=1)

    # A FIN would surface as RemoteProtocolError; only an RST gives "connection reset" here.
    with pytest.raises(httpx.ReadError):
        lookup(client, server, IDS)
    assert server.requests[0].kind == "reset"
    assert lookup(client, server, IDS).json() == {"results": NORMAL_RESULTS}


def test_hang_fault_never_answers_and_lets_go_when_the_client_leaves(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("hang")
    started = time.monotonic()

    with pytest.raises(httpx.ReadTimeout):
        lookup(client, server, IDS, timeout=httpx.Timeout(5.0, read=0.2))

    assert 0.2 <= time.monotonic() - started < 2.0
    assert server.requests[0].kind == "hang"
    # The handler notices the client gave up instead of holding its thread until stop().
    assert eventually(lambda: not connection_threads(server))


def test_drip_fault_delivers_a_valid_body_one_byte_per_interval(
    server: RoutingServer, client: httpx.Client
) -> None:
    normal = lookup(client, server, ["b1", "b2"]).content
    interval, read_timeout = 0.01, 0.25
    server.add_fault("drip", interval=interval)
    started = time.monotonic()

    # The per-read timeout is 25 intervals, so it never fires though the whole body is slower.
    with client.stream(
        "POST",
        server.url,
        json={"ids": ["b1", "b2"]},
        timeout=httpx.Timeout(5.0, read=read_timeout),
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(normal))
        chunks = list(response.iter_raw())
    elapsed = time.monotonic() - started

    assert b"".join(chunks) == normal
    assert len(chunks) > 1
    assert elapsed >= 0.9 * interval * len(normal)
    assert elapsed > 2 * read_timeout
    assert server.requests[-1].kind == "drip"


def test_truncated_fault_with_actual_length_is_valid_http_but_cut_json(
    server: RoutingServer, client: httpx.Client
) -> None:
    normal = lookup(client, server, IDS).content
    server.add_fault("truncated")

    response = lookup(client, server, IDS)

    assert response.status_code == 200
    assert response.content == normal[: len(normal) // 2]
    assert response.headers["content-length"] == str(len(response.content))
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_truncated_fault_with_full_length_closes_before_the_body_ends(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("truncated", content_length="full")

    with pytest.raises(httpx.RemoteProtocolError):
        lookup(client, server, IDS)


# -- bodies that are not the contract --------------------------------------------------------


def test_malformed_fault_sends_json_content_type_with_a_non_json_body(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("malformed")

    response = lookup(client, server, IDS)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_empty_fault_sends_200_with_no_body(server: RoutingServer, client: httpx.Client) -> None:
    server.add_fault("empty")

    response = lookup(client, server, IDS)

    assert (response.status_code, response.content) == (200, b"")


def test_null_fault_sends_the_json_null(server: RoutingServer, client: httpx.Client) -> None:
    server.add_fault("null")

    response = lookup(client, server, IDS)

    assert (response.status_code, response.content) == (200, b"null")


def test_html_fault_sends_an_error_page_with_200(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("html")

    response = lookup(client, server, IDS)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.startswith("<html>")


# -- answers that break the id bookkeeping ---------------------------------------------------


def result_ids(response: httpx.Response) -> list[object]:
    return [entry["id"] for entry in response.json()["results"]]


def test_missing_id_fault_drops_the_first_or_the_named_id(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("missing_id", times=1)
    server.add_fault("missing_id", id="b3", times=1)

    assert result_ids(lookup(client, server, IDS)) == ["b2", "b3", "b4"]
    assert lookup(client, server, IDS).json() == {
        "results": [r for r in NORMAL_RESULTS if r["id"] != "b3"]
    }


def test_extra_id_fault_adds_an_unrequested_id(server: RoutingServer, client: httpx.Client) -> None:
    server.add_fault("extra_id", times=1)
    server.add_fault("extra_id", id="b9", routed=False, times=1)

    default = lookup(client, server, IDS).json()["results"]
    named = lookup(client, server, IDS).json()["results"]

    assert default == [*NORMAL_RESULTS, {"id": "unrequested-build", "routed": True}]
    assert named == [*NORMAL_RESULTS, {"id": "b9", "routed": False}]


def test_duplicate_id_fault_repeats_an_id_with_the_same_value(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("duplicate_id", times=1)
    server.add_fault("duplicate_id", id="b2", times=1)

    first = lookup(client, server, IDS).json()["results"]
    named = lookup(client, server, IDS).json()["results"]

    assert first == [*NORMAL_RESULTS, {"id": "b1", "routed": True}]
    assert named == [*NORMAL_RESULTS, {"id": "b2", "routed": False}]


def test_contradictory_id_fault_repeats_an_id_with_the_opposite_value(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("contradictory_id", times=1)
    server.add_fault("contradictory_id", id="b2", times=1)

    first = lookup(client, server, IDS).json()["results"]
    named = lookup(client, server, IDS).json()["results"]

    assert first == [*NORMAL_RESULTS, {"id": "b1", "routed": False}]
    assert named == [*NORMAL_RESULTS, {"id": "b2", "routed": True}]


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("routed_string", [{"id": "b1", "routed": "true"}, {"id": "b2", "routed": "false"}]),
        ("routed_int", [{"id": "b1", "routed": 1}, {"id": "b2", "routed": 0}]),
        ("id_int", [{"id": 1, "routed": True}, {"id": 2, "routed": False}]),
        ("results_dict", {"b1": True, "b2": False}),
        ("missing_routed", [{"id": "b1"}, {"id": "b2"}]),
    ],
)
def test_mistyped_fault_bends_the_types(
    server: RoutingServer, client: httpx.Client, how: str, expected: object
) -> None:
    server.add_fault("mistyped", how=how)  # type: ignore[arg-type]

    response = lookup(client, server, ["b1", "b2"])

    assert response.status_code == 200
    # Compare the raw JSON: Python would call True == 1 equal.
    assert response.text == json.dumps({"results": expected})


def test_wrong_results_key_fault_renames_the_list(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("wrong_results_key", times=1)
    server.add_fault("wrong_results_key", key="data", times=1)

    assert lookup(client, server, IDS).json() == {"routes": NORMAL_RESULTS}
    assert lookup(client, server, IDS).json() == {"data": NORMAL_RESULTS}


# -- when faults fire ------------------------------------------------------------------------


def test_times_limits_a_fault_then_normal_answers_resume(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("status", code=500, times=2)

    codes = [lookup(client, server, IDS).status_code for _ in range(3)]

    assert codes == [500, 500, 200]
    assert [r.kind for r in server.requests] == ["status", "status", "ok"]


def test_a_fault_without_times_fires_every_time(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("null", match="all")

    assert [lookup(client, server, IDS).content for _ in range(3)] == [b"null"] * 3


def test_match_targets_only_matching_batches(server: RoutingServer, client: httpx.Client) -> None:
    server.add_fault("status", code=503, match=lambda ids: "b170" in ids)

    plain = lookup(client, server, ["b1", "b2"])
    targeted = lookup(client, server, ["b169", "b170"])
    plain_again = lookup(client, server, ["b171"])

    assert [r.status_code for r in (plain, targeted, plain_again)] == [200, 503, 200]


def test_first_matching_fault_wins_and_clear_faults_restores_normal_answers(
    server: RoutingServer, client: httpx.Client
) -> None:
    server.add_fault("status", code=503, match=lambda ids: "b2" in ids)
    server.add_fault("null")

    assert lookup(client, server, ["b2"]).status_code == 503
    assert lookup(client, server, ["b1"]).content == b"null"
    server.clear_faults()
    assert lookup(client, server, ["b2"]).json() == {"results": [NORMAL_RESULTS[1]]}


@pytest.mark.parametrize(
    ("kind", "params", "error"),
    [
        ("hang", {"interval": 0.1}, TypeError),
        ("status", {"retry_after": 1}, ValueError),
        ("status", {"code": 99}, ValueError),
        ("mistyped", {}, ValueError),
        ("mistyped", {"how": "routed_float"}, ValueError),
        ("drip", {"interval": 0}, ValueError),
        ("truncated", {"content_length": "half"}, ValueError),
        ("null", {"times": 0}, ValueError),
        ("teleport", {}, ValueError),
    ],
)
def test_add_fault_rejects_what_it_would_ignore_or_misread(
    server: RoutingServer, kind: str, params: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        server.add_fault(kind, **params)  # type: ignore[arg-type]


# -- lifecycle -------------------------------------------------------------------------------


def test_stop_returns_promptly_with_hanging_dripping_and_idle_connections() -> None:
    outcomes: list[BaseException | None] = []

    def call(url: str, ids: list[str]) -> None:
        try:
            with httpx.Client(timeout=30.0, verify=TLS) as http:
                http.post(url, json={"ids": ids})
        except Exception as error:  # reported to the test thread, not lost in this one
            outcomes.append(error)
        else:
            outcomes.append(None)

    with httpx.Client(timeout=TIMEOUT, verify=TLS) as idle_client:
        server = RoutingServer().start()
        server.add_fault("hang", match=lambda ids: ids == ["hang"])
        server.add_fault("drip", interval=5.0, match=lambda ids: ids == ["drip"])
        assert lookup(idle_client, server, ["idle"]).status_code == 200  # stays pooled, idle
        callers = [
            threading.Thread(target=call, args=(server.url, [ids]))
            for ids in ("hang", "hang", "drip")
        ]
        for caller in callers:
            caller.start()
        assert server.wait_for_requests(4)

        started = time.monotonic()
        server.stop()
        stop_seconds = time.monotonic() - started
        for caller in callers:
            caller.join(timeout=5.0)

        assert stop_seconds < 1.5
        assert not connection_threads(server)
        assert len(outcomes) == 3
        assert all(
            isinstance(outcome, httpx.RemoteProtocolError | httpx.ReadError) for outcome in outcomes
        ), outcomes
        assert server.errors == []
        server.stop()  # idempotent


def test_wait_for_requests_gives_up_after_its_timeout(server: RoutingServer) -> None:
    started = time.monotonic()

    assert server.wait_for_requests(1, timeout=0.1) is False
    assert time.monotonic() - started < 1.0


def test_url_needs_a_started_server() -> None:
    with pytest.raises(RuntimeError):
        _ = RoutingServer().url
