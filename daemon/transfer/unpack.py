"""What every way of bringing an image in shares: unpacking layers and recording the image.

Layers become snapshots named by chain ID, exactly as ``ctr``'s unpack names them, so images
pulled or imported by either client share snapshots. A layer is extracted into an active
snapshot under a random ``extract-…`` key, checked against its diff ID and only then committed
under the chain ID: a crash mid-way never leaves a committed half-layer.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from typing import Any

from pyctr.api import errdefs
from pyctr.daemon.content.store import ContentStore
from pyctr.daemon.diff.differ import Descriptor as DiffDescriptor
from pyctr.daemon.diff.differ import Differ
from pyctr.daemon.events import Exchange
from pyctr.daemon.metadata import images as imagestore
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.snapshots.store import SnapshotStore

UNCOMPRESSED = "containerd.io/uncompressed"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def random_id(prefix: str) -> str:
    return f"{prefix}-{time.time_ns()}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


async def label(content: ContentStore, ns: str, dgst: str, labels: dict[str, str]) -> None:
    if labels:
        await content.update(ns, dgst, labels, [f"labels.{k}" for k in labels])


async def apply_layer(
    ns: str,
    lease: str,
    store: SnapshotStore,
    differ: Differ,
    content: ContentStore,
    layer: DiffDescriptor,
    diff_id: str,
    chain: str,
    parent: str,
) -> bool:
    """Unpack one layer onto ``parent`` as snapshot ``chain``; False if it was already there."""
    try:
        await store.stat(ns, chain)
        return False
    except errdefs.NotFound:
        pass
    key = f"{random_id('extract')} {chain}"
    mounts = await store.prepare(ns, key, parent, {}, lease)
    committed = False
    try:
        applied = await differ.apply(ns, layer, mounts)
        if applied.digest != diff_id:
            raise errdefs.FailedPrecondition(
                f"wrong diff id calculated on extraction {applied.digest}, expected {diff_id}"
            )
        try:
            await store.commit(ns, chain, key, {}, lease)
            committed = True  # the commit consumed the extraction key
        except errdefs.AlreadyExists:
            pass  # unpacked concurrently by someone else: theirs is as good as ours
    finally:
        if not committed:
            try:
                await store.remove(ns, key)  # a failed or superfluous extraction
            except errdefs.NotFound:
                pass
    await label(content, ns, layer.digest, {UNCOMPRESSED: diff_id})
    return True


async def store_image(
    db: DB,
    exchange: Exchange,
    ns: str,
    name: str,
    target: imagestore.Descriptor,
    labels: dict[str, str],
) -> imagestore.Image:
    """Create the image record, or point an existing one at the new target; publish the event."""
    from pyctr.api._pb.containerd.services.images.v1 import ImageCreate, ImageUpdate

    img = imagestore.Image(name=name, target=target, labels=dict(labels))

    def tx(c: Any) -> tuple[imagestore.Image, bool]:
        try:
            return imagestore.create(c, ns, img), True
        except errdefs.AlreadyExists:
            return imagestore.update(c, ns, img, []), False

    stored, created = await db.update(tx)
    if created:
        exchange.publish(ns, "/images/create", ImageCreate(name=stored.name, labels=stored.labels))
    else:
        exchange.publish(ns, "/images/update", ImageUpdate(name=stored.name, labels=stored.labels))
    return stored
