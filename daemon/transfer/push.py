"""Server-side push: an image from the image store to a registry repository.

The image's tree is walked from the content store: an index's manifests that are present here
(containerd pushes "all platforms present in the store": a pull of one platform leaves the
index naming others, and those cannot be pushed), each manifest's config and layers. Blobs go
first, children before parents, so a registry that checks references (distribution does) has
everything a manifest names when it arrives; child manifests are pushed by digest, the top one
under the reference's tag (or its digest when the reference has none). A blob or manifest the
registry already holds is not uploaded again (the client checks with HEAD first).

Progress, per blob and manifest, with containerd's event names (``parents`` is the manifest or
index that names it)::

    waiting          0 of size      before the registry is asked
    uploading        n of size      as the bytes go out (at most every 100 ms)
    complete         size of size   uploaded
    already exists   size of size   the registry had it: nothing was sent
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pyctr.api import errdefs
from pyctr.daemon.content.store import ContentStore
from pyctr.daemon.metadata import images as imagestore
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.remotes import reference as refmod
from pyctr.daemon.remotes.auth import CredentialsFunc
from pyctr.daemon.remotes.registry import INDEX_TYPES, MANIFEST_TYPES, Descriptor, RegistryClient
from pyctr.daemon.transfer.pull import ClientFactory, Progress, ProgressFunc

PROGRESS_INTERVAL = 0.1  # seconds between two "uploading" reports of one blob


class Pusher:
    def __init__(self, db: DB, content: ContentStore, client_factory: ClientFactory) -> None:
        self.db = db
        self.content = content
        self.client_factory = client_factory

    async def _read(self, ns: str, dgst: str) -> bytes:
        return b"".join([c async for _, c in await self.content.read(ns, dgst)])

    async def _stream(
        self, ns: str, blob: Descriptor, report: ProgressFunc, parents: tuple[str, ...]
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from the content store, reporting how many went out."""
        sent, last = 0, time.monotonic()
        async for _, chunk in await self.content.read(ns, blob.digest):
            yield chunk
            sent += len(chunk)
            if time.monotonic() - last >= PROGRESS_INTERVAL:
                report(Progress("uploading", blob.digest, parents, sent, blob.size))
                last = time.monotonic()

    async def _present(self, ns: str, dgst: str) -> bool:
        try:
            await self.content.info(ns, dgst)
            return True
        except errdefs.NotFound:
            return False

    async def push(
        self,
        ns: str,
        name: str,
        ref_text: str,
        progress: ProgressFunc | None = None,
        *,
        credentials: CredentialsFunc | None = None,
        headers: dict[str, str] | None = None,
    ) -> Descriptor:
        report = progress or (lambda p: None)
        ref = refmod.parse(ref_text)
        try:
            img = await self.db.view(lambda c: imagestore.get(c, ns, name))
        except errdefs.NotFound:
            raise errdefs.NotFound(f"image {name!r}") from None
        t = img.target
        top = Descriptor(t.media_type, t.digest, t.size)
        client = self.client_factory(credentials=credentials, headers=headers)
        pushed: set[str] = set()
        try:
            report(Progress(f"Pushing to {ref}", str(ref)))
            await self._push_tree(ns, client, ref, top, report, pushed, is_top=True)
            report(Progress(f"Completed push to {ref}", str(ref)))
            return top
        finally:
            await client.close()

    async def _push_tree(
        self,
        ns: str,
        client: RegistryClient,
        ref: refmod.Reference,
        desc: Descriptor,
        report: ProgressFunc,
        pushed: set[str],
        is_top: bool = False,
        parents: tuple[str, ...] = (),
    ) -> None:
        data = await self._read(ns, desc.digest)
        doc: dict[str, Any] = json.loads(data)
        media_type = desc.media_type or str(doc.get("mediaType", ""))
        here = (desc.digest,)
        if media_type in INDEX_TYPES:
            children = [Descriptor.from_dict(m) for m in doc.get("manifests", [])]
            present = [c for c in children if await self._present(ns, c.digest)]
            if not present:
                raise errdefs.NotFound(f"image index {desc.digest}: none of its manifests are in the store")
            for child in present:
                await self._push_tree(ns, client, ref, child, report, pushed, parents=here)
        elif media_type in MANIFEST_TYPES:
            blobs = [Descriptor.from_dict(doc["config"])]
            blobs += [Descriptor.from_dict(d) for d in doc.get("layers", [])]
            for blob in blobs:
                if blob.digest in pushed:
                    continue
                if not await self._present(ns, blob.digest):
                    raise errdefs.NotFound(
                        f"content {blob.digest} of manifest {desc.digest} is not in the store"
                    )
                report(Progress("waiting", blob.digest, here, 0, blob.size))
                uploaded = await client.push_blob(ref, blob, self._stream(ns, blob, report, here))
                pushed.add(blob.digest)
                _done(report, uploaded, blob, here)
        else:
            raise errdefs.NotImplementedErr(f"cannot push {media_type or 'an unknown media type'}")
        target = ref if is_top else ref.with_digest(desc.digest)
        mdesc = Descriptor(media_type, desc.digest, desc.size)
        report(Progress("waiting", desc.digest, parents, 0, desc.size))
        _done(report, await client.push_manifest(target, mdesc, data), mdesc, parents)


def _done(report: ProgressFunc, uploaded: bool, desc: Descriptor, parents: tuple[str, ...]) -> None:
    event = "complete" if uploaded else "already exists"
    report(Progress(event, desc.digest, parents, desc.size, desc.size))
