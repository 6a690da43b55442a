"""Image records: a name pointing at a target descriptor, with labels, per namespace."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pyctr.api import digest as digestmod
from pyctr.api import filters, labels
from pyctr.api.errdefs import AlreadyExists, InvalidArgument, NotFound
from pyctr.api.identifiers import goquote
from pyctr.daemon.metadata.db import dump_labels, ensure_namespace, load_labels, now_ns, set_labels


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


def _stored(image: Image) -> Image:
    """The image as it is stored: labels and target annotations without empty values."""
    target = replace(image.target, annotations=set_labels(image.target.annotations))
    return replace(image, labels=set_labels(image.labels), target=target)


def validate(image: Image) -> None:
    if not image.name:
        raise InvalidArgument("image name must not be empty")
    labels.validate_all(image.labels, "image.Labels")
    t = image.target
    try:
        digestmod.validate(t.digest)
    except InvalidArgument as exc:
        raise InvalidArgument(f"Target.Digest {goquote(t.digest)} invalid: {exc.message}") from None
    if t.size <= 0:
        raise InvalidArgument("Target.Size must be greater than zero")
    if not t.media_type:
        raise InvalidArgument("Target.MediaType must be set")


def _image(row: sqlite3.Row) -> Image:
    return Image(
        name=row["name"],
        target=Descriptor(
            row["target_media_type"],
            row["target_digest"],
            row["target_size"],
            load_labels(row["target_annotations"]),
        ),
        labels=load_labels(row["labels"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def get(conn: sqlite3.Connection, ns: str, name: str) -> Image:
    row = conn.execute("SELECT * FROM images WHERE namespace = ? AND name = ?", (ns, name)).fetchone()
    if row is None:
        raise NotFound(f"image {goquote(name)}")
    return _image(row)


def adaptor(image: Image) -> filters.DictAdaptor:
    return filters.DictAdaptor(
        {
            "name": image.name or None,
            "target": {"digest": image.target.digest or None, "mediatype": image.target.media_type or None},
            "labels": image.labels,
            "annotations": image.target.annotations,
        }
    )


_LIST = (
    "SELECT name, target_media_type, target_digest, target_size, target_annotations, labels,"
    " created_at, updated_at FROM images WHERE namespace = ? ORDER BY name"
)


def list_images(conn: sqlite3.Connection, ns: str, fs: Sequence[str]) -> list[Image]:
    flt = filters.parse_all(fs)
    # Plain tuples (no sqlite3.Row lookups by name): a List reads every image of the namespace.
    cursor = conn.execute(_LIST, (ns,))
    cursor.row_factory = None
    imgs = [
        Image(
            name,
            Descriptor(media_type, dgst, size, load_labels(annotations)),
            load_labels(lbls),
            created,
            updated,
        )
        for name, media_type, dgst, size, annotations, lbls, created, updated in cursor
    ]
    if flt is filters.always:
        return imgs
    return [img for img in imgs if flt.match(adaptor(img))]


def _write(conn: sqlite3.Connection, ns: str, image: Image, insert: bool) -> None:
    t = image.target
    values = (
        dump_labels(image.labels),
        t.media_type,
        t.digest,
        t.size,
        dump_labels(t.annotations),
        image.created_at,
        image.updated_at,
        ns,
        image.name,
    )
    if insert:
        conn.execute(
            "INSERT INTO images(labels, target_media_type, target_digest, target_size, target_annotations,"
            " created_at, updated_at, namespace, name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
    else:
        conn.execute(
            "UPDATE images SET labels = ?, target_media_type = ?, target_digest = ?, target_size = ?,"
            " target_annotations = ?, created_at = ?, updated_at = ? WHERE namespace = ? AND name = ?",
            values,
        )


def create(conn: sqlite3.Connection, ns: str, image: Image) -> Image:
    validate(image)
    ensure_namespace(conn, ns)
    if conn.execute("SELECT 1 FROM images WHERE namespace = ? AND name = ?", (ns, image.name)).fetchone():
        raise AlreadyExists(f"image {goquote(image.name)}")
    t = now_ns()
    created = replace(_stored(image), created_at=t, updated_at=t)
    _write(conn, ns, created, insert=True)
    return created


def update(conn: sqlite3.Connection, ns: str, image: Image, paths: Sequence[str]) -> Image:
    if not image.name:
        raise InvalidArgument("image name is required for update")
    current = get(conn, ns, image.name)
    updated = current
    if not paths:
        updated = image
    for path in paths:
        if path.startswith("labels."):
            key = path.removeprefix("labels.")
            lbls = dict(updated.labels)
            lbls[key] = image.labels.get(key, "")
            updated = replace(updated, labels=lbls)
        elif path.startswith("annotations."):
            key = path.removeprefix("annotations.")
            ann = dict(updated.target.annotations)
            ann[key] = image.target.annotations.get(key, "")
            updated = replace(updated, target=replace(updated.target, annotations=ann))
        elif path == "labels":
            updated = replace(updated, labels=dict(image.labels))
        elif path == "target":
            updated = replace(updated, target=image.target)
        elif path == "annotations":
            updated = replace(
                updated, target=replace(updated.target, annotations=dict(image.target.annotations))
            )
        else:
            raise InvalidArgument(f"cannot update {goquote(path)} field on image {goquote(image.name)}")
    # An empty value clears a label or an annotation, as it does everywhere else.
    updated = _stored(updated)
    validate(updated)
    updated = replace(updated, created_at=current.created_at, updated_at=now_ns())
    _write(conn, ns, updated, insert=False)
    return updated


def delete(conn: sqlite3.Connection, ns: str, name: str) -> None:
    cur = conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (ns, name))
    if cur.rowcount == 0:
        raise NotFound(f"image {goquote(name)}")
