"""The native snapshotter: every snapshot is a full copy of its parent; mounts are binds.

Slower and bigger than overlayfs, but it works on any filesystem and in places overlay cannot
(nested overlay, some user namespaces).
"""

from __future__ import annotations

import os

from pyctr.api.mount import Mount
from pyctr.snapshotter import fs, storage
from pyctr.snapshotter.base import Kind
from pyctr.snapshotter.dirs import DirSnapshotter

PLUGIN_ID = "native"


class NativeSnapshotter(DirSnapshotter):
    def _populate(self, tmp: str, s: storage.Snapshot) -> None:
        if s.parent_ids:
            fs.copy_tree(self.fs_path(s.parent_ids[0]), os.path.join(tmp, "fs"))
        else:
            os.makedirs(os.path.join(tmp, "fs"), mode=0o755)

    def _mounts(self, s: storage.Snapshot) -> list[Mount]:
        flag = "ro" if s.kind == Kind.VIEW else "rw"
        return [Mount(type="bind", source=self.fs_path(s.id), options=(flag, "rbind"))]
