"""A bounded HTTP load generator and a request fuzzer for the scoring server.

Used by `benchmarks/serving.py` (latency, throughput, fuzzing under load) and by the serving
tests (following the registry under load, fuzzing). Everything is bounded: a load stops
after a fixed number of requests or a time limit, whichever comes first, and the fuzzer
makes a fixed number of requests from a seed.

Clients are threads, each with its own keep-alive connection (`http.client`, no third-party
client in the way of the timing); a time is client-side wall time from sending the body to
having decoded the JSON answer.
"""

from __future__ import annotations

import copy
import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Answer:
    """One request's outcome."""

    status: int
    seconds: float
    version: str | None  # the X-Model-Version header
    body: Any  # the decoded JSON answer (None if it was not JSON)
    kind: str = ""  # what was sent (the fuzzer's label)
    started: float = 0.0  # perf_counter at sending


class Client:
    """One keep-alive HTTP connection to a server's `/invocations`."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        self._address = (parts.hostname, parts.port)
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, kind: str = "") -> Answer:
        started = time.perf_counter()
        for attempt in (0, 1):  # a server may close an idle keep-alive connection
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(*self._address, timeout=self._timeout)
                self._conn.request(
                    "POST", "/invocations", body, {"Content-Type": "application/json"}
                )
                response = self._conn.getresponse()
                raw = response.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        return Answer(
            response.status,
            time.perf_counter() - started,
            response.getheader("X-Model-Version"),
            decoded,
            kind,
            started,
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class LoadResult:
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole load


def bounded_load(
    url: str,
    bodies: list[tuple[bytes, str]],
    clients: int = 1,
    max_requests: int = 100,
    time_limit: float = 60.0,
) -> LoadResult:
    """Send `bodies` (cyclically) from `clients` concurrent clients until `max_requests`
    have been answered or `time_limit` seconds have passed; every answer, in sending order
    per client."""
    lock = threading.Lock()
    sent = [0]
    result = LoadResult()
    deadline = time.perf_counter() + time_limit

    def work() -> None:
        client = Client(url)
        mine = []
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        break
                    i = sent[0]
                    sent[0] += 1
                body, kind = bodies[i % len(bodies)]
                mine.append(client.post(body, kind))
        finally:
            client.close()
            with lock:
                result.answers.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    result.answers.sort(key=lambda a: a.started)
    return result


def fuzz_bodies(
    valid: dict, n: int, seed: int, max_candidates: int, max_body_bytes: int
) -> list[tuple[bytes, str]]:
    """`n` request bodies, about a quarter valid and the rest malformed, too many candidates or
    too large, each labelled: `valid` (expect 200), `malformed` (expect 400), `too_many`
    (expect 422), `too_large` (expect 413), `broken` (some 4xx: invalid JSON or HTTP-level).

    `valid` is a candidate request (`{"context": ..., "candidates": [...]}`).
    """
    rng = random.Random(seed)
    valid_body = json.dumps(valid).encode()
    mutations = [
        _wrong_type,
        _wrong_type,
        _bad_pair,
        _bad_pair,
        _misplaced_field,
        _unknown_key,
        _drop_key,
    ]
    bodies: list[tuple[bytes, str]] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.25:
            bodies.append((valid_body, "valid"))
        elif roll < 0.30:
            many = {**valid, "candidates": valid["candidates"][:1] * (max_candidates + 1)}
            bodies.append((json.dumps(many).encode(), "too_many"))
        elif roll < 0.33:
            pad = b" " * (max_body_bytes + 1 - len(valid_body) + rng.randint(0, 1000))
            bodies.append((valid_body[:-1] + pad + b"}", "too_large"))
        elif roll < 0.45:
            bodies.append((_broken_json(rng, valid_body), "broken"))
        else:
            request = copy.deepcopy(valid)
            rng.choice(mutations)(rng, request)
            bodies.append((json.dumps(request).encode(), "malformed"))
    return bodies


# Values that are neither a field map nor a list of them (`{}` is a valid empty context).
_NOT_FIELD_MAPS: list[Any] = [None, "abc", -1, 2**63, 1.5, True, [], [[]], [1, 2, 3], "NaN"]


def _some_list(rng: random.Random, request: dict) -> tuple[dict, str]:
    """A random field map (the context or a candidate) and one of its fields."""
    target = request["context"] if rng.random() < 0.3 else rng.choice(request["candidates"])
    return target, rng.choice(sorted(target))


def _wrong_type(rng: random.Random, request: dict) -> None:
    where = rng.random()
    if where < 0.2:
        request[rng.choice(["context", "candidates"])] = rng.choice(_NOT_FIELD_MAPS)
    elif where < 0.35:
        request["candidates"][rng.randrange(len(request["candidates"]))] = rng.choice(
            [None, 5, "x", [1, 2], []]
        )
    else:
        target, name = _some_list(rng, request)
        target[name] = rng.choice([None, 7, "x", {"a": 1}, [5], [[1]]])


def _bad_pair(rng: random.Random, request: dict) -> None:
    target, name = _some_list(rng, request)
    pairs = target[name] or [[1, 1.0]]
    pairs[rng.randrange(len(pairs))] = rng.choice(
        [
            ["abc", 1.0],
            [1.5, 1.0],
            [-3, 1.0],
            [2**63, 1.0],
            [2**70, 1.0],
            [1, "w"],
            [1, None],
            [1, 1.0, 2.0],
            [1],
            [],
            [True, 1.0],
            [1, float("inf")],
            [1, float("nan")],
            {"id": 1},
        ]
    )
    target[name] = pairs


def _misplaced_field(rng: random.Random, request: dict) -> None:
    if rng.random() < 0.5:
        request["context"]["205"] = [[1, 1.0]]  # an impression-side field in the context
    else:
        request["candidates"][0]["101"] = [[1, 1.0]]  # a user-side field in a candidate


def _unknown_key(rng: random.Random, request: dict) -> None:
    if rng.random() < 0.5:
        request[rng.choice(["extra", "dataframe_records", "inputs"])] = []
    else:
        request["candidates"][0][rng.choice(["999", "", "ids_205"])] = [[1, 1.0]]


def _drop_key(rng: random.Random, request: dict) -> None:
    del request[rng.choice(["context", "candidates"])]


def _broken_json(rng: random.Random, valid_body: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return valid_body[: rng.randrange(1, len(valid_body))]  # truncated
    if kind == 1:
        return b"[" * 5000 + b"]" * 5000  # nested deeper than a parser allows
    if kind == 2:
        return b""
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    return b'{"context": {}, "candidates": [{"205": [[NaN, 1.0]]}]}'
