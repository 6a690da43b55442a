"""What overlayfs and native share: directories per snapshot id under ``<root>/snapshots``.

    <root>/metadata.db            snapshot metadata (see storage.py)
    <root>/snapshots/<id>/fs      the snapshot's files (overlay: its upper dir)
    <root>/snapshots/<id>/work    overlay's work dir (overlay only)

A new snapshot is built in a temp directory and renamed into place after its metadata commits,
so a crash leaves either nothing or a directory whose id has no metadata, which ``cleanup``
removes.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Mapping, Sequence

from pyctr.api.mount import Mount
from pyctr.snapshotter import fs, storage
from pyctr.snapshotter.base import Info, Kind, Usage, inherited_labels


class DirSnapshotter:
    """Common logic; subclasses provide :meth:`_mounts` and :meth:`_populate`."""

    # Whether _populate is slow enough for a worker thread (a tree copy), or a few mkdirs that
    # take less time than the hop to a thread would.
    populate_blocks = True

    def __init__(self, root: str, store: storage.Storage) -> None:
        self.root = root
        self.store = store

    @classmethod
    async def create(cls, root: str) -> DirSnapshotter:
        os.makedirs(os.path.join(root, "snapshots"), mode=0o700, exist_ok=True)
        store = await storage.Storage.open(os.path.join(root, "metadata.db"))
        return cls(root, store)

    def fs_path(self, sid: int) -> str:
        return os.path.join(self.root, "snapshots", str(sid), "fs")

    def work_path(self, sid: int) -> str:
        return os.path.join(self.root, "snapshots", str(sid), "work")

    # -- subclass hooks ---------------------------------------------------------------------------

    def _mounts(self, s: storage.Snapshot) -> list[Mount]:
        raise NotImplementedError

    def _populate(self, tmp: str, s: storage.Snapshot) -> None:
        """Fill a new snapshot's temp directory (blocking)."""
        os.makedirs(os.path.join(tmp, "fs"), mode=0o755)

    # -- the Snapshotter protocol -----------------------------------------------------------------

    async def stat(self, key: str) -> Info:
        return (await self.store.tx(lambda c: storage.get_info(c, key)))[1]

    async def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        return await self.store.tx(lambda c: storage.update(c, info, fieldpaths))

    async def usage(self, key: str) -> Usage:
        sid, info, usage = await self.store.tx(lambda c: storage.get_info(c, key))
        if info.kind == Kind.ACTIVE:
            return await asyncio.to_thread(fs.disk_usage, self.fs_path(sid))
        if usage == storage.UNMEASURED:  # committed, not asked for yet: its files hold still
            usage = await asyncio.to_thread(fs.disk_usage, self.fs_path(sid))
            await self.store.tx(lambda c: storage.set_usage(c, sid, usage))
        return usage

    async def mounts(self, key: str) -> list[Mount]:
        s = await self.store.tx(lambda c: storage.get_snapshot(c, key))
        return self._mounts(s)

    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return await self._create(Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return await self._create(Kind.VIEW, key, parent, labels)

    async def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        tmp = tempfile.mkdtemp(prefix="new-", dir=os.path.join(self.root, "snapshots"))
        try:
            s = await self.store.tx(lambda c: storage.create(c, kind, key, parent, inherited_labels(labels)))
            try:
                if self.populate_blocks:
                    await asyncio.to_thread(self._populate, tmp, s)
                else:
                    self._populate(tmp, s)
                os.rename(tmp, os.path.join(self.root, "snapshots", str(s.id)))
            except BaseException:
                await self.store.tx(lambda c: storage.remove(c, key))
                raise
        except BaseException:
            fs.remove_tree(tmp)
            raise
        return self._mounts(s)

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        # One transaction; the usage is measured when first asked for (see storage.py).
        lbls = inherited_labels(labels)
        await self.store.tx(lambda c: storage.commit_active(c, key, name, storage.UNMEASURED, lbls))

    async def remove(self, key: str) -> None:
        sid, _ = await self.store.tx(lambda c: storage.remove(c, key))
        path = os.path.join(self.root, "snapshots", str(sid))
        doomed = os.path.join(self.root, "snapshots", f"rm-{sid}")
        try:
            os.rename(path, doomed)  # gone from view at once; the bytes go in a thread
        except FileNotFoundError:
            return
        await asyncio.to_thread(fs.remove_tree, doomed)

    async def walk(self) -> list[Info]:
        return await self.store.tx(storage.walk)

    async def cleanup(self) -> None:
        """Remove directories that no snapshot owns (debris of crashes or interrupted removals)."""
        live = await self.store.tx(storage.ids)
        base = os.path.join(self.root, "snapshots")
        for name in os.listdir(base):
            if name.isdigit() and int(name) in live:
                continue
            await asyncio.to_thread(fs.remove_tree, os.path.join(base, name))

    async def close(self) -> None:
        await self.store.close()
