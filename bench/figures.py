"""The registry of figures: what each measures, in which unit, and what it needs from pyctrd.

A figure is a class with ``setup``/``measure``/``teardown`` per daemon (plus ``prepare``/``finish``
once per run); ``bench.runner`` calls ``measure`` alternately on both daemons. One ``measure``
call returns one value per declared metric, so figures that share an expensive set-up (fifty
running containers) report several rows.

Every figure the issue lists is registered, including those pyctrd cannot serve yet: their
``needs`` name the RPCs they use, and the runner skips them while pyctrd answers UNIMPLEMENTED.
Registering them now keeps the table's shape stable and makes each one light up by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

from grpclib.const import Cardinality

from bench.stats import Better
from pyctr.api._pb.containerd.services.diff.v1 import ApplyRequest
from pyctr.api._pb.containerd.types import Descriptor

if TYPE_CHECKING:
    from bench.fixtures import Fixtures
    from bench.harness import Session, Side


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: Better = "lower"


@dataclass(frozen=True)
class Rpc:
    """A method a figure calls on the daemon, probed on pyctrd before the figure runs."""

    service: str  # e.g. "containerd.services.images.v1.Images"
    method: str
    cardinality: Cardinality = Cardinality.UNARY_UNARY
    probe: bytes = b""  # the request sent to probe; empty unless empty is unsafe (see DIFF_PROBE)

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def short(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.method}"


def rpc(
    service: str, method: str, cardinality: Cardinality = Cardinality.UNARY_UNARY, probe: bytes = b""
) -> Rpc:
    """``rpc("images", "List")`` for ``containerd.services.images.v1.Images/List``."""
    return Rpc(f"containerd.services.{service}.v1.{service.capitalize()}", method, cardinality, probe)


# containerd 1.6.20 dereferences a nil descriptor on an empty Diff.Apply and the whole daemon dies
# (SIGSEGV in services/diff.toDescriptor). With a descriptor of absent content it answers NOT_FOUND.
DIFF_PROBE = bytes(
    ApplyRequest(
        diff=Descriptor(
            media_type="application/vnd.oci.image.layer.v1.tar", digest="sha256:" + "0" * 64, size=1
        )
    )
)


# The RPC sets of the client flows the later figures use (ctr 1.6 does the pull client-side).
PULL_RPCS = (
    rpc("content", "Write", Cardinality.STREAM_STREAM),
    rpc("content", "Info"),
    rpc("images", "Create"),
    rpc("snapshots", "Prepare"),
    rpc("snapshots", "Commit"),
    rpc("diff", "Apply", probe=DIFF_PROBE),
)
RUN_RPCS = (
    *PULL_RPCS,
    rpc("containers", "Create"),
    rpc("tasks", "Create"),
    rpc("tasks", "Start"),
    rpc("tasks", "Wait"),
    rpc("tasks", "Kill"),
    rpc("tasks", "Delete"),
    rpc("tasks", "List"),
)


@dataclass
class Context:
    """What a figure may use: the session (daemons, loop fs), fixtures, and a place for notes."""

    session: Session
    fixtures: Fixtures
    runs: int
    notes: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print

    def note(self, text: str) -> None:
        """A line printed under the figure's table row: reference numbers, caveats."""
        self.notes.append(text)


class Figure:
    id: ClassVar[str]
    title: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]
    quick: ClassVar[bool] = False  # part of ``make bench-quick``
    needs: ClassVar[tuple[Rpc, ...]] = ()  # RPCs pyctrd must implement
    needs_pyctr: ClassVar[tuple[str, ...]] = ()  # a pyctr subcommand the figure runs, e.g. "images pull"
    fixtures: ClassVar[tuple[str, ...]] = ()  # built on demand: "busybox", "big"

    def host_unsupported(self) -> str:
        """Why this host cannot run the figure on any daemon (a tool the kernel rejects), else ""."""
        return ""

    def prepare(self, ctx: Context) -> None:
        """Once per run, before any daemon's ``setup``."""

    def setup(self, ctx: Context, side: Side) -> None:
        """Once per daemon, before the warm-up."""

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        """One repetition on one daemon; ``rep`` makes IDs unique ("w" for the warm-up, then 0..)."""
        raise NotImplementedError

    def teardown(self, ctx: Context, side: Side) -> None:
        """Once per daemon, also after a failure."""

    def finish(self, ctx: Context) -> None:
        """Once per run, also after a failure."""


REGISTRY: list[Figure] = []
F = TypeVar("F", bound=type[Figure])


def register(cls: F) -> F:
    if any(f.id == cls.id for f in REGISTRY):
        raise ValueError(f"figure {cls.id} registered twice")
    REGISTRY.append(cls())
    return cls


def all_figures() -> list[Figure]:
    # Importing the modules fills REGISTRY; the order of imports is the order of the table.
    from bench import figures_api, figures_content, figures_tasks  # noqa: F401

    return list(REGISTRY)
