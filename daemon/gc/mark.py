"""Garbage-collection marking, as pure code over a graph of resources.

A node is ``(kind, namespace, key)``: kinds are ``content`` (key: digest), ``ingest`` (key: ref),
``snapshot`` (key: ``<snapshotter>/<snapshot key>``), ``lease``, ``image`` and ``container``
(key: id or name). Roots are whatever must survive by itself (unexpired leases, images,
containers, objects labelled ``containerd.io/gc.root``, fresh unleased ingests); everything
reachable from a root is live, everything else is garbage.

References come from labels, exactly as containerd reads them:
``containerd.io/gc.ref.content`` (alone, or followed by ``.`` or ``/`` and anything) names a
digest in the same namespace; ``containerd.io/gc.ref.snapshot.<snapshotter>`` (optionally
followed by ``/`` and anything) names a snapshot key of that snapshotter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

Node = tuple[str, str, str]

CONTENT = "content"
INGEST = "ingest"
SNAPSHOT = "snapshot"
LEASE = "lease"
IMAGE = "image"
CONTAINER = "container"

_CONTENT_PREFIX = "containerd.io/gc.ref.content"
_SNAPSHOT_PREFIX = "containerd.io/gc.ref.snapshot."
ROOT_LABEL = "containerd.io/gc.root"


def label_refs(ns: str, labels: Mapping[str, str]) -> Iterator[Node]:
    """The nodes a set of labels references."""
    for key, value in labels.items():
        if not value:
            continue
        if key.startswith(_CONTENT_PREFIX):
            rest = key[len(_CONTENT_PREFIX) :]
            if rest == "" or rest[0] in "./":
                yield (CONTENT, ns, value)
        elif key.startswith(_SNAPSHOT_PREFIX):
            snapshotter = key[len(_SNAPSHOT_PREFIX) :].split("/", 1)[0]
            if snapshotter:
                yield (SNAPSHOT, ns, f"{snapshotter}/{value}")


def is_root(labels: Mapping[str, str]) -> bool:
    return ROOT_LABEL in labels


def mark(
    roots: Iterable[Node],
    edges: Callable[[Node], Iterable[Node]],
    flat: Callable[[Node], bool] = lambda n: False,
    parents: Callable[[Node], Iterable[Node]] = lambda n: (),
) -> set[Node]:
    """Every node reachable from ``roots``.

    A node for which ``flat`` is true (a lease labelled ``containerd.io/gc.flat``) keeps what it
    references directly, but not what those objects reference in turn -- except their
    ``parents`` (a subset of ``edges``: a snapshot's parent chain), which containerd keeps for a
    flat-leased snapshot too, since the snapshot cannot exist without them.
    """
    live: set[Node] = set()
    shallow: set[Node] = set()  # kept, but children not (yet) followed
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        shallow.discard(node)
        if flat(node):
            for child in edges(node):
                if child not in live:
                    shallow.add(child)
            continue
        stack.extend(c for c in edges(node) if c not in live)
    todo = list(shallow)
    while todo:
        for parent in parents(todo.pop()):
            if parent not in live and parent not in shallow:
                shallow.add(parent)
                todo.append(parent)
    return live | shallow
