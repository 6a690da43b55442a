from __future__ import annotations

import asyncio

import pytest

from pyctr.api._pb.containerd.events import NamespaceCreate, TaskExit
from pyctr.api.errdefs import InvalidArgument, ResourceExhausted
from pyctr.daemon.events import Envelope, Exchange, validate_topic


async def collect(sub: object, n: int) -> list[Envelope]:
    out: list[Envelope] = []
    async for env in sub:  # type: ignore[attr-defined]
        out.append(env)
        if len(out) == n:
            break
    return out


def test_publish_reaches_matching_subscribers_only() -> None:
    async def main() -> None:
        ex = Exchange()
        everything = ex.subscribe()
        tasks_only = ex.subscribe(['topic~="^/tasks/"'])
        by_field = ex.subscribe(["event.container_id==c1"])
        ns_b = ex.subscribe(["namespace==b"])
        ex.publish("a", "/namespaces/create", NamespaceCreate(name="a", labels={"x": "y"}))
        ex.publish("b", "/tasks/exit", TaskExit(container_id="c1", exit_status=3))
        ex.publish("b", "/tasks/exit", TaskExit(container_id="c2"))
        got = await collect(everything, 3)
        assert [e.topic for e in got] == ["/namespaces/create", "/tasks/exit", "/tasks/exit"]
        assert got[0].type_url == "containerd.events.NamespaceCreate"
        assert NamespaceCreate.parse(got[0].value).labels == {"x": "y"}
        assert len(await collect(tasks_only, 2)) == 2
        [one] = await collect(by_field, 1)
        assert TaskExit.parse(one.value).exit_status == 3
        assert [e.namespace for e in await collect(ns_b, 2)] == ["b", "b"]

    asyncio.run(main())


def test_slow_subscriber_is_cut_off_without_blocking_publishers() -> None:
    async def main() -> None:
        ex = Exchange(queue_size=8)
        slow = ex.subscribe()
        fast = ex.subscribe()
        received = []

        async def consume() -> None:
            async for env in fast:
                received.append(env)
                if len(received) == 100:
                    return

        consumer = asyncio.create_task(consume())
        for i in range(100):
            ex.publish("a", "/namespaces/create", NamespaceCreate(name=f"n{i}"))
            await asyncio.sleep(0)  # the fast consumer keeps up; the slow one never reads
        await asyncio.wait_for(consumer, 5)
        assert len(received) == 100
        with pytest.raises(ResourceExhausted):
            async for _ in slow:
                pass
        assert ex.subscriber_count == 0  # both gone: one finished, one cut off

    asyncio.run(main())


def test_abandoned_iteration_unsubscribes() -> None:
    async def main() -> None:
        ex = Exchange()
        sub = ex.subscribe()

        async def reader() -> None:
            async for _ in sub:
                pass

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.01)
        assert ex.subscriber_count == 1
        task.cancel()  # what grpclib does when the client goes away
        await asyncio.gather(task, return_exceptions=True)
        assert ex.subscriber_count == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("", "must not be empty"),
        ("tasks/exit", "must start with '/'"),
        ("/", "must have at least one component"),
        ("/tasks//exit", "failed validation on component"),
        ("/tasks/ex it", "failed validation on component"),
    ],
)
def test_topic_validation(topic: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_topic(topic)


def test_forward_checks_namespace() -> None:
    ex = Exchange()
    with pytest.raises(InvalidArgument, match="envelope namespace"):
        ex.forward(Envelope(0, "bad ns", "/x", "containerd.events.TaskExit", b""))
