"""A mount, as containerd passes them around: a serialised mount(2) call.

Snapshotters emit mounts and never mount for their caller; clients (``ctr``, the shim, the
differ) consume them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = field(default_factory=tuple)

    def option(self, prefix: str) -> str | None:
        """The value of the first ``prefix=value`` option, if any."""
        for opt in self.options:
            if opt.startswith(prefix + "="):
                return opt[len(prefix) + 1 :]
        return None

    @property
    def readonly(self) -> bool:
        return "ro" in self.options
