"""Routing lookups: for every build, positive evidence that it is or is not routed.

Two sources share one retry-and-deadline loop:

* :class:`HttpRouting` POSTs ``{"ids": [...]}`` and expects
  ``{"results": [{"id": ..., "routed": true|false}, ...]}`` naming every
  requested id exactly once (see :func:`parse_answer`).
* :class:`SqlRouting` reads a routes table: a build is routed iff a row names it.

A batch either returns an answer for every id it asked about, or fails as a
whole. There is no partial success: a batch that times out, errors, or answers
with a missing, extra, duplicated or mistyped id yields no answers at all, so
its builds stay *unknown* and the run is blocked. That is the incident this
project exists to prevent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, Self

import httpx
from sqlalchemy import Engine, MetaData, Table, select, text
from sqlalchemy.exc import NoSuchTableError, OperationalError, SQLAlchemyError

from .db import ConfigurationError, Redactor
from .planning import BuildId, LookupReceipt, RouteAnswer
from .spec import HttpRoutingSpec, RetrySpec, RoutingSpec, SqlRoutingSpec

__all__ = [
    "AnswerError",
    "BatchResult",
    "HttpRouting",
    "RoutingLookup",
    "SqlRouting",
    "parse_answer",
]


class AnswerError(ValueError):
    """The routing API's answer breaks the contract; the batch has failed."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    receipt: LookupReceipt
    answers: dict[BuildId, RouteAnswer]


class RoutingLookup(Protocol):
    """A routing source. Use it inside ``async with``: clients live as long as one run."""

    source: str

    async def lookup(self, index: int, ids: Sequence[BuildId]) -> BatchResult:
        """Answer for every id, or a failed receipt and no answers. Never raises."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


def parse_answer(requested: Sequence[str], body: bytes) -> dict[str, bool]:
    """Validate a routing answer against the ids asked for; raise AnswerError on any doubt."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AnswerError(f"the body is not JSON ({len(body)} bytes)") from None
    if not isinstance(payload, dict):
        raise AnswerError(f"the body is JSON {type(payload).__name__}, not an object")
    results = payload.get("results")
    if not isinstance(results, list):
        raise AnswerError("'results' is missing or is not a list")
    return well_formed_results(requested, results) or checked_results(requested, results)


def checked_results(requested: Sequence[str], results: list[Any]) -> dict[str, bool]:
    """Walk the answer item by item: the answers, or an AnswerError saying exactly what is
    wrong. Only a faulty answer needs this; a correct one passes well_formed_results."""
    wanted = set(requested)
    answers: dict[str, bool] = {}
    for position, item in enumerate(results):
        if not isinstance(item, dict):
            raise AnswerError(f"results[{position}] is not an object")
        build_id, routed = item.get("id"), item.get("routed")
        if not isinstance(build_id, str):
            raise AnswerError(f"results[{position}].id is {type(build_id).__name__}, not a string")
        # bool only: 1, "true" or null are not evidence.
        if not isinstance(routed, bool):
            raise AnswerError(
                f"results[{position}].routed for id {build_id!r} is "
                f"{type(routed).__name__}, not a boolean"
            )
        if build_id not in wanted:
            raise AnswerError(f"the answer names id {build_id!r}, which was not asked for")
        if build_id in answers:
            if answers[build_id] != routed:
                raise AnswerError(f"id {build_id!r} is answered both routed and not routed")
            raise AnswerError(f"id {build_id!r} is answered twice")
        answers[build_id] = routed
    missing = wanted - answers.keys()
    if missing:
        example = sorted(missing)[0]
        raise AnswerError(
            f"{len(missing)} requested ids are missing from the answer, e.g. {example!r}"
        )
    return answers


def well_formed_results(requested: Sequence[str], results: list[Any]) -> dict[str, bool] | None:
    """The answers when the batch is exactly right, else None (or an empty dict for an empty
    batch): built-in loops, no per-item Python branches, since every id of every plan passes
    through here. It must accept nothing that checked_results refuses."""
    try:
        answers = {item["id"]: item["routed"] for item in results}
    except (TypeError, KeyError):
        return None
    if (
        len(answers) == len(results) == len(requested)
        and all(type(routed) is bool for routed in answers.values())
        and all(type(build_id) is str for build_id in answers)
        and answers.keys() == set(requested)
    ):
        return answers
    return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


async def _with_retries(
    attempt: Callable[[], Awaitable[dict[BuildId, RouteAnswer]]],
    *,
    index: int,
    size: int,
    deadline: timedelta,
    retries: RetrySpec,
    redact: Redactor,
    sleep: Callable[[float], Awaitable[None]],
) -> BatchResult:
    """Run one batch with retries and backoff, all inside one overall deadline."""
    started = time.monotonic()
    limit = deadline.total_seconds()
    attempts = 0
    error = "no attempt was made"
    try:
        async with asyncio.timeout(limit):
            while True:
                attempts += 1
                try:
                    answers = await attempt()
                except _Retryable as exc:
                    error = str(exc)
                    if attempts >= retries.max_attempts:
                        error = f"failed {attempts} attempts, the last with {error}"
                        break
                    backoff = min(
                        retries.initial_backoff.total_seconds() * 2 ** (attempts - 1),
                        retries.max_backoff.total_seconds(),
                    )
                    delay = max(backoff, exc.retry_after or 0.0)
                    remaining = limit - (time.monotonic() - started)
                    if delay >= remaining:
                        error += (
                            f"; retrying after {delay:g}s would pass the {limit:g}s batch deadline"
                        )
                        break
                    await sleep(delay)
                    continue
                except _Fatal as exc:
                    error = str(exc)
                    break
                receipt = LookupReceipt(index, size, True, attempts, time.monotonic() - started)
                return BatchResult(receipt, answers)
    except TimeoutError:
        error = f"no complete answer within the {limit:g}s batch deadline (last: {error})"
    receipt = LookupReceipt(
        index, size, False, attempts, time.monotonic() - started, redact(error)[:500]
    )
    return BatchResult(receipt, {})


class HttpRouting:
    """Lookups against the routing HTTP API, one shared client, bounded concurrency."""

    source = "http"

    def __init__(
        self,
        routing: RoutingSpec,
        token: str | None,
        redact: Redactor,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        http = routing.http
        if http is None:
            raise ConfigurationError("spec.routing.http is not set")
        self._http: HttpRoutingSpec = http
        self._routing = routing
        self._redact = redact
        self._sleep = sleep
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if token is not None:
            redact.add(token)
            self._headers[http.token_header] = http.token_prefix + token
        self._connect_timeout = routing.connect_timeout.total_seconds()
        self._read_timeout = routing.read_timeout.total_seconds()
        self._client: httpx.AsyncClient | None = None
        self._users = 0

    async def __aenter__(self) -> Self:
        # One client per run, shared by every batch; it belongs to the run's event loop.
        if self._users == 0:
            connect, read = self._connect_timeout, self._read_timeout
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=connect, read=read, write=read, pool=connect),
                limits=httpx.Limits(
                    max_connections=self._routing.concurrency,
                    max_keepalive_connections=self._routing.concurrency,
                ),
                follow_redirects=False,
                trust_env=False,
            )
        self._users += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._users -= 1
        if self._users == 0 and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _attempt(
        self, wire_ids: list[str], by_wire: dict[str, BuildId], index: int
    ) -> dict[BuildId, RouteAnswer]:
        if self._client is None:
            raise RuntimeError(
                "HttpRouting.lookup() must run inside 'async with' the routing source"
            )
        try:
            response = await self._client.post(
                self._http.url, json={"ids": wire_ids}, headers=self._headers
            )
        except httpx.ReadTimeout:
            raise _Retryable(
                f"ReadTimeout: no data within the {self._read_timeout:g}s read timeout"
            ) from None
        except httpx.ConnectTimeout:
            raise _Retryable(
                f"ConnectTimeout: not connected within {self._connect_timeout:g}s"
            ) from None
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}", _retry_after(response))
        if status != 200:
            raise _Fatal(f"HTTP {status}")
        try:
            answers = parse_answer(wire_ids, response.content)
        except AnswerError as exc:
            raise _Fatal(f"bad answer: {exc}") from None
        # Two shared answers per batch: a million builds need not be a million objects.
        yes, no = RouteAnswer(True, self.source, index), RouteAnswer(False, self.source, index)
        return {by_wire[w]: yes if routed else no for w, routed in answers.items()}

    async def lookup(self, index: int, ids: Sequence[BuildId]) -> BatchResult:
        by_wire = {str(i): i for i in ids}
        wire_ids = list(by_wire)
        return await _with_retries(
            lambda: self._attempt(wire_ids, by_wire, index),
            index=index,
            size=len(ids),
            deadline=self._routing.batch_deadline,
            retries=self._routing.retries,
            redact=self._redact,
            sleep=self._sleep,
        )


class SqlRouting:
    """Lookups in a routes table, in worker threads so the event loop stays free."""

    source = "sql"

    def __init__(self, routing: RoutingSpec, engine: Engine, redact: Redactor) -> None:
        sql = routing.sql
        if sql is None:
            raise ConfigurationError("spec.routing.sql is not set")
        self._sql: SqlRoutingSpec = sql
        self._routing = routing
        self._engine = engine
        self._redact = redact
        try:
            table = Table(sql.table, MetaData(), schema=sql.db_schema, autoload_with=engine)
        except NoSuchTableError:
            raise ConfigurationError(
                f"spec.routing.sql.table: table {sql.table!r} does not exist"
            ) from None
        except SQLAlchemyError as exc:
            raise ConfigurationError(f"cannot read the routes table: {type(exc).__name__}") from exc
        for field, column in (("buildId", sql.build_id), ("hostname", sql.hostname)):
            if column not in table.c:
                raise ConfigurationError(
                    f"spec.routing.sql.{field}: column {column!r} "
                    f"does not exist in table {sql.table!r}"
                )
        self._build_id = table.c[sql.build_id]
        self._hostname = table.c[sql.hostname]
        try:
            self._key_type: type = self._build_id.type.python_type
        except NotImplementedError:
            self._key_type = str

    def _key(self, build_id: BuildId) -> Any:
        return int(str(build_id)) if self._key_type is int else str(build_id)

    def _query(self, ids: Sequence[BuildId], index: int) -> dict[BuildId, RouteAnswer]:
        keys = {self._key(i): i for i in ids}
        query = select(self._build_id, self._hostname).where(self._build_id.in_(list(keys)))
        deadline_ms = int(self._routing.batch_deadline.total_seconds() * 1000)
        try:
            with self._engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text(f"SET LOCAL statement_timeout = {deadline_ms:d}"))
                rows = conn.execute(query).all()
        except OperationalError as exc:
            raise _Retryable(f"database error: {type(exc.orig).__name__}: {exc.orig}") from None
        except SQLAlchemyError as exc:
            raise _Fatal(f"database error: {type(exc).__name__}") from None
        hosts: dict[BuildId, str] = {}
        for key, hostname in rows:
            if key in keys:
                hosts.setdefault(keys[key], str(hostname))
        no = RouteAnswer(False, self.source, index)
        return {
            build_id: RouteAnswer(True, self.source, index, hosts[build_id])
            if build_id in hosts
            else no
            for build_id in ids
        }

    async def lookup(self, index: int, ids: Sequence[BuildId]) -> BatchResult:
        return await _with_retries(
            lambda: asyncio.to_thread(self._query, ids, index),
            index=index,
            size=len(ids),
            deadline=self._routing.batch_deadline,
            retries=self._routing.retries,
            redact=self._redact,
            sleep=asyncio.sleep,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None
