"""Container records: what to run (spec, runtime) and on what (snapshot), per namespace.

The spec and the runtime options are stored as the client sent them (type URL and bytes), never
re-encoded: ``ctr`` sends the OCI spec as JSON under a custom type URL.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pyctr.api import filters, identifiers, labels
from pyctr.api.errdefs import AlreadyExists, InvalidArgument, NotFound
from pyctr.api.identifiers import goquote
from pyctr.daemon.metadata.db import dump_labels, ensure_namespace, load_labels, now_ns, set_labels

AnyValue = tuple[str, bytes]  # (type_url, value)


@dataclass(frozen=True)
class Container:
    id: str
    runtime_name: str
    spec: AnyValue | None
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    runtime_options: AnyValue | None = None
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, AnyValue] = field(default_factory=dict)
    sandbox: str = ""
    created_at: int = 0
    updated_at: int = 0


def validate(c: Container) -> None:
    try:
        identifiers.validate(c.id)
    except InvalidArgument as exc:
        raise InvalidArgument(f"container.ID: {exc.message}") from None
    if any(not k for k in c.extensions):
        raise InvalidArgument("container.Extension keys must not be zero-length")
    labels.validate_all(c.labels, "containers.Labels")
    if not c.runtime_name:
        raise InvalidArgument("container.Runtime.Name must be set")
    if c.spec is None:
        raise InvalidArgument("container.Spec must be set")
    if c.snapshot_key and not c.snapshotter:
        raise InvalidArgument("container.Snapshotter must be set if container.SnapshotKey is set")


def _dump_ext(ext: dict[str, AnyValue]) -> str:
    return json.dumps({k: [t, base64.b64encode(v).decode()] for k, (t, v) in sorted(ext.items())})


def _load_ext(text: str) -> dict[str, AnyValue]:
    return {k: (t, base64.b64decode(v)) for k, (t, v) in json.loads(text or "{}").items()}


def _any(type_url: str, value: bytes | None) -> AnyValue | None:
    return None if value is None else (type_url, bytes(value))


def _container(row: sqlite3.Row) -> Container:
    return Container(
        id=row["id"],
        runtime_name=row["runtime_name"],
        spec=_any(row["spec_type"], row["spec"]),
        labels=load_labels(row["labels"]),
        image=row["image"],
        runtime_options=_any(row["runtime_options_type"], row["runtime_options"]),
        snapshotter=row["snapshotter"],
        snapshot_key=row["snapshot_key"],
        extensions=_load_ext(row["extensions"]),
        sandbox=row["sandbox"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def get(conn: sqlite3.Connection, ns: str, cid: str) -> Container:
    row = conn.execute("SELECT * FROM containers WHERE namespace = ? AND id = ?", (ns, cid)).fetchone()
    if row is None:
        raise NotFound(f"container {goquote(cid)} in namespace {goquote(ns)}")
    return _container(row)


def adaptor(c: Container) -> filters.DictAdaptor:
    return filters.DictAdaptor(
        {
            "id": c.id or None,
            "runtime": {"name": c.runtime_name or None},
            "image": c.image or None,
            "labels": c.labels,
        }
    )


def list_containers(conn: sqlite3.Connection, ns: str, fs: Sequence[str]) -> list[Container]:
    flt = filters.parse_all(fs)
    rows = conn.execute("SELECT * FROM containers WHERE namespace = ? ORDER BY id", (ns,))
    return [c for c in map(_container, rows) if flt.match(adaptor(c))]


def _write(conn: sqlite3.Connection, ns: str, c: Container, insert: bool) -> None:
    ro_t, ro_v = c.runtime_options or ("", None)
    sp_t, sp_v = c.spec or ("", None)
    values = (
        dump_labels(c.labels),
        c.image,
        c.runtime_name,
        ro_t,
        ro_v,
        sp_t,
        sp_v,
        c.snapshotter,
        c.snapshot_key,
        _dump_ext(c.extensions),
        c.sandbox,
        c.created_at,
        c.updated_at,
        ns,
        c.id,
    )
    if insert:
        conn.execute(
            "INSERT INTO containers(labels, image, runtime_name, runtime_options_type, runtime_options,"
            " spec_type, spec, snapshotter, snapshot_key, extensions, sandbox, created_at, updated_at,"
            " namespace, id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
    else:
        conn.execute(
            "UPDATE containers SET labels = ?, image = ?, runtime_name = ?, runtime_options_type = ?,"
            " runtime_options = ?, spec_type = ?, spec = ?, snapshotter = ?, snapshot_key = ?, extensions = ?,"
            " sandbox = ?, created_at = ?, updated_at = ? WHERE namespace = ? AND id = ?",
            values,
        )


def create(conn: sqlite3.Connection, ns: str, c: Container, lease: str = "") -> Container:
    try:
        validate(c)
    except InvalidArgument as exc:
        raise InvalidArgument(f"create container failed validation: {exc.message}") from None
    ensure_namespace(conn, ns)
    if conn.execute("SELECT 1 FROM containers WHERE namespace = ? AND id = ?", (ns, c.id)).fetchone():
        raise AlreadyExists(f"container {goquote(c.id)}")
    t = now_ns()
    created = replace(c, labels=set_labels(c.labels), created_at=t, updated_at=t)
    _write(conn, ns, created, insert=True)
    return created


_ALL_PATHS = ("labels", "spec", "extensions", "image", "snapshotkey")


def update(conn: sqlite3.Connection, ns: str, c: Container, paths: Sequence[str]) -> Container:
    if not c.id:
        raise InvalidArgument("must specify a container id")
    current = get(conn, ns, c.id)
    if not paths:
        # Without a mask every mutable field is replaced, and immutable ones must not change.
        paths = _ALL_PATHS
        if c.snapshotter and c.snapshotter != current.snapshotter:
            raise InvalidArgument("container.Snapshotter field is immutable")
        if c.runtime_name and c.runtime_name != current.runtime_name:
            raise InvalidArgument("container.Runtime.Name field is immutable")
    updated = current
    for path in paths:
        if path.startswith("labels."):
            key = path.removeprefix("labels.")
            lbls = dict(updated.labels)
            lbls[key] = c.labels.get(key, "")
            updated = replace(updated, labels={k: v for k, v in lbls.items() if v})
        elif path.startswith("extensions."):
            key = path.removeprefix("extensions.")
            ext = dict(updated.extensions)
            if key in c.extensions:
                ext[key] = c.extensions[key]
            else:
                ext.pop(key, None)
            updated = replace(updated, extensions=ext)
        elif path == "labels":
            updated = replace(updated, labels=set_labels(c.labels))
        elif path == "spec":
            updated = replace(updated, spec=c.spec)
        elif path == "extensions":
            updated = replace(updated, extensions=dict(c.extensions))
        elif path == "image":
            updated = replace(updated, image=c.image)
        elif path == "snapshotkey":
            updated = replace(updated, snapshot_key=c.snapshot_key)
        else:
            raise InvalidArgument(f"cannot update {goquote(path)} field on {goquote(c.id)}")
    try:
        validate(updated)
    except InvalidArgument as exc:
        raise InvalidArgument(f"update failed validation: {exc.message}") from None
    updated = replace(updated, updated_at=now_ns())
    _write(conn, ns, updated, insert=False)
    return updated


def delete(conn: sqlite3.Connection, ns: str, cid: str) -> None:
    cur = conn.execute("DELETE FROM containers WHERE namespace = ? AND id = ?", (ns, cid))
    if cur.rowcount == 0:
        raise NotFound(f"cannot delete container {goquote(cid)} in namespace {goquote(ns)}")
