"""EtcdStore's failover and error mapping with fake clients (no etcd needed).

Each endpoint gets a fake client that fails or answers as the test says; the
store must fail over without closing the client it leaves, map every library
failure to a ``CalicnmError`` and close its clients only in ``close()``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from etcd3 import exceptions as e3

from calicnm.errors import CalicnmError, DatastoreUnavailable
from calicnm.store.etcd import EtcdStore, parse_endpoints


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeClient:
    def __init__(self, name: str) -> None:
        self.name = name
        self.fail: BaseException | None = None
        self.closed = False
        self.calls = 0

    def get(self, key: str) -> tuple[bytes | None, Any]:
        self.calls += 1
        if self.closed:
            raise ValueError("Cannot invoke RPC on closed channel!")
        if self.fail is not None:
            raise self.fail
        return None, None

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EtcdStore, list[FakeClient]]]:
    clients = [FakeClient(f"c{i}") for i in range(3)]
    made: list[int] = []

    def connect(self: EtcdStore, index: int) -> FakeClient:
        made.append(index)
        return clients[index]

    monkeypatch.setattr(EtcdStore, "_connect", connect)
    store = EtcdStore(parse_endpoints("http://a:1,http://b:2,http://c:3"), timeout=0.3)
    yield store, clients
    assert len(made) == len(set(made)), f"a client was made twice: {made}"


def test_failover_switches_without_closing(fakes: tuple[EtcdStore, list[FakeClient]]) -> None:
    store, (a, b, c) = fakes
    assert store.get("/k") is None
    assert store.current() == "http://a:1"
    a.fail = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert store.get("/k") is None
    assert store.current() == "http://b:2"
    assert not a.closed, "failover closed the client it left"
    b.fail = e3.ConnectionTimeoutError()
    assert store.get("/k") is None
    assert store.current() == "http://c:3"
    assert not (a.closed or b.closed)
    store.close()
    assert a.closed and b.closed and c.closed
    with pytest.raises(DatastoreUnavailable, match="closed"):
        store.get("/k")


@pytest.mark.parametrize(
    "failure",
    [
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down"),
        FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"),
        FakeRpcError(grpc.StatusCode.UNKNOWN, "tls"),
        FakeRpcError(grpc.StatusCode.INTERNAL, "RST_STREAM"),
        FakeRpcError(grpc.StatusCode.CANCELLED, "Channel closed!"),
        e3.ConnectionFailedError(),
        e3.ConnectionTimeoutError(),
        e3.InternalServerError(),
        e3.WatchTimedOut(),
        ValueError("Cannot invoke RPC on closed channel!"),
        ValueError("Cannot invoke RPC: Channel closed!"),
    ],
)
def test_reachability_failures_are_unavailable(
    fakes: tuple[EtcdStore, list[FakeClient]], failure: BaseException
) -> None:
    store, clients = fakes
    for c in clients:
        c.fail = failure
    with pytest.raises(DatastoreUnavailable, match=r"etcd is unreachable at a:1, b:2, c:3"):
        store.get("/k")
    assert all(c.calls >= 1 for c in clients), "an endpoint was not tried"
    assert not any(c.closed for c in clients)


@pytest.mark.parametrize(
    "failure",
    [
        FakeRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"
        ),
        FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large"),
        e3.PreconditionFailedError(),
        e3.RevisionCompactedError(5),
        ValueError("something else"),
        RuntimeError("a bug in the library"),
    ],
)
def test_other_failures_are_calicnm_errors(
    fakes: tuple[EtcdStore, list[FakeClient]], failure: BaseException
) -> None:
    store, (a, b, _c) = fakes
    a.fail = failure
    with pytest.raises(CalicnmError) as caught:
        store.get("/k")
    assert not isinstance(caught.value, DatastoreUnavailable)
    assert "refused the request" in str(caught.value)
    assert b.calls == 0, "a refusal is not a reason to try another endpoint"


def test_in_flight_calls_survive_another_threads_failover(
    fakes: tuple[EtcdStore, list[FakeClient]],
) -> None:
    """The defect: thread 1 is inside a call on b when thread 2 fails over
    from b to c; b must not be closed under thread 1."""
    store, (a, _b, _c) = fakes
    a.fail = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")
    entered, release = threading.Event(), threading.Event()
    results: list[object] = []

    class Slow(FakeClient):
        """b: slow for thread 1, failing for everyone else."""

        def get(self, key: str) -> tuple[bytes | None, Any]:
            if threading.current_thread().name == "thread1":
                entered.set()
                release.wait(5)
                return super().get(key)
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "b is overloaded")

    slow = Slow("b")
    store._clients[1] = slow

    def thread1() -> None:
        try:
            results.append(store.get("/k"))
        except BaseException as exc:
            results.append(exc)

    t = threading.Thread(target=thread1, name="thread1")
    t.start()
    assert entered.wait(5)
    assert store.get("/k") is None  # thread 2: a and b fail, c answers
    assert store.current() == "http://c:3"
    assert not slow.closed
    release.set()
    t.join(5)
    assert results == [None], "the call in flight on b was cut off"
    store.close()
