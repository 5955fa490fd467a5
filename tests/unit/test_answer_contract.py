"""The routing answer contract: anything but a complete, exact answer is refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployment_cleanup.routing import (
    AnswerError,
    checked_results,
    parse_answer,
    well_formed_results,
)

ASKED = ["b1", "b2", "b3"]


def body(results: object) -> bytes:
    return json.dumps({"results": results}).encode()


def test_complete_exact_answer_is_accepted() -> None:
    good = body(
        [{"id": "b1", "routed": True}, {"id": "b2", "routed": False}, {"id": "b3", "routed": False}]
    )
    assert parse_answer(ASKED, good) == {"b1": True, "b2": False, "b3": False}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"", "not JSON", id="empty"),
        pytest.param(b"null", "not an object", id="null"),
        pytest.param(b"<html>502</html>", "not JSON", id="html"),
        pytest.param(b'{"results": [{"id": "b1", "rou', "not JSON", id="truncated"),
        pytest.param(b"\xff\xfe", "not JSON", id="binary"),
        pytest.param(b'{"routes": []}', "'results' is missing", id="wrong-key"),
        pytest.param(b'{"results": {"b1": true}}', "not a list", id="results-dict"),
        pytest.param(
            body([{"id": "b1", "routed": True}, {"id": "b2", "routed": False}]),
            "missing",
            id="missing",
        ),
        pytest.param(
            body([{"id": i, "routed": False} for i in [*ASKED, "b9"]]), "not asked for", id="extra"
        ),
        pytest.param(
            body([{"id": i, "routed": False} for i in [*ASKED, "b1"]]),
            "answered twice",
            id="duplicate",
        ),
        pytest.param(
            body([{"id": "b1", "routed": True}, *({"id": i, "routed": False} for i in ASKED)]),
            "both routed and not routed",
            id="contradictory",
        ),
        pytest.param(
            body([{"id": i, "routed": "false"} for i in ASKED]), "not a boolean", id="routed-string"
        ),
        pytest.param(
            body([{"id": i, "routed": 0} for i in ASKED]), "not a boolean", id="routed-int"
        ),
        pytest.param(
            body([{"id": i, "routed": None} for i in ASKED]), "not a boolean", id="routed-null"
        ),
        pytest.param(body([{"id": i} for i in ASKED]), "not a boolean", id="routed-missing"),
        pytest.param(body([{"id": 1, "routed": False}]), "not a string", id="id-int"),
        pytest.param(body(["b1", "b2", "b3"]), "not an object", id="items-strings"),
    ],
)
def test_malformed_or_partial_answers_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(AnswerError, match=message):
        parse_answer(ASKED, raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
items = st.fixed_dictionaries(
    {
        "id": st.one_of(st.sampled_from(["b1", "b2", "b3", "b4"]), json_values),
        "routed": st.one_of(st.booleans(), json_values),
    }
)


PAYLOADS = st.one_of(
    json_values,
    st.fixed_dictionaries({"results": st.lists(items, max_size=6)}),
    st.fixed_dictionaries({"results": json_values}),
)
ASKED_IDS = st.lists(st.sampled_from(["b1", "b2", "b3", "b4"]), min_size=1, max_size=4, unique=True)


def assert_exact_or_refused(payload: object, asked: list[str]) -> None:
    """An answer is accepted only if it answers every asked id exactly once with a boolean."""
    raw = json.dumps(payload).encode()
    try:
        answers = parse_answer(asked, raw)
    except AnswerError:
        return
    assert set(answers) == set(asked)
    assert isinstance(payload, dict)
    results = payload["results"]
    assert isinstance(results, list)
    assert len(results) == len(asked)
    for item in results:
        assert isinstance(item["routed"], bool)
        assert answers[item["id"]] is item["routed"]


@settings(max_examples=1500, deadline=None)
@given(payload=PAYLOADS, asked=ASKED_IDS)
def test_no_generated_answer_yields_evidence_it_does_not_contain(
    payload: object, asked: list[str]
) -> None:
    assert_exact_or_refused(payload, asked)


_ids = st.sampled_from(["b1", "b2", "b3", "b4", 1, None, True, ["b1"]])
_items = st.one_of(
    st.fixed_dictionaries(
        {"id": _ids, "routed": st.sampled_from([True, False, 0, 1, "true", None])}
    ),
    st.fixed_dictionaries({"id": _ids}),
    st.dictionaries(st.sampled_from(["id", "routed", "extra"]), _ids),
    st.sampled_from([None, "b1", 1, ["b1", True]]),
)


@settings(max_examples=2000, deadline=None)
@given(results=st.lists(_items, max_size=6), asked=st.lists(st.sampled_from(ASKED), unique=True))
def test_the_fast_path_accepts_only_what_the_item_by_item_check_accepts(
    results: list[object], asked: list[str]
) -> None:
    fast = well_formed_results(asked, results)  # type: ignore[arg-type]
    try:
        checked = checked_results(asked, results)  # type: ignore[arg-type]
    except AnswerError:
        assert not fast
        return
    assert fast is None or fast == checked
