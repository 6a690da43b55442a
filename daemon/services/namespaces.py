"""containerd.services.namespaces.v1.Namespaces."""

from __future__ import annotations

import sqlite3

from pyctr.api import namespaces
from pyctr.api._pb.containerd.events import NamespaceCreate, NamespaceDelete, NamespaceUpdate
from pyctr.api._pb.containerd.services.namespaces.v1 import (
    CreateNamespaceRequest,
    CreateNamespaceResponse,
    DeleteNamespaceRequest,
    GetNamespaceRequest,
    GetNamespaceResponse,
    ListNamespacesRequest,
    ListNamespacesResponse,
    Namespace,
    NamespacesBase,
    UpdateNamespaceRequest,
    UpdateNamespaceResponse,
)
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import ContainerdError, InvalidArgument
from pyctr.api.identifiers import goquote
from pyctr.daemon import plugin
from pyctr.daemon.events import Exchange
from pyctr.daemon.metadata import namespaces as store
from pyctr.daemon.metadata.db import DB


def _caller_namespace(fallback: str) -> str:
    """containerd publishes create and update events under the caller's namespace, not the new one.

    Without a valid caller namespace containerd fails the call after the write; we publish under
    the namespace itself instead.
    """
    try:
        return namespaces.required()
    except ContainerdError:
        return fallback


class NamespacesService(NamespacesBase):
    def __init__(self, db: DB, exchange: Exchange) -> None:
        self.db = db
        self.exchange = exchange

    async def get(self, message: GetNamespaceRequest) -> GetNamespaceResponse:
        lbls = await self.db.view(lambda c: store.get_labels(c, message.name))
        return GetNamespaceResponse(namespace=Namespace(name=message.name, labels=lbls))

    async def list(self, message: ListNamespacesRequest) -> ListNamespacesResponse:
        def job(c: sqlite3.Connection) -> list[Namespace]:
            return [Namespace(name=n, labels=store.get_labels(c, n)) for n in store.list_names(c)]

        return ListNamespacesResponse(namespaces=await self.db.view(job))

    async def create(self, message: CreateNamespaceRequest) -> CreateNamespaceResponse:
        ns = message.namespace or Namespace()
        created = await self.db.update(lambda c: store.create(c, ns.name, dict(ns.labels)))
        self.exchange.publish(
            _caller_namespace(created.name),
            "/namespaces/create",
            NamespaceCreate(name=created.name, labels=created.labels),
        )
        return CreateNamespaceResponse(namespace=Namespace(name=created.name, labels=created.labels))

    async def update(self, message: UpdateNamespaceRequest) -> UpdateNamespaceResponse:
        ns = message.namespace or Namespace()
        paths = list(message.update_mask.paths) if message.update_mask else []
        wanted = dict(ns.labels)

        def job(c: sqlite3.Connection) -> dict[str, str]:
            if paths:
                current = store.get_labels(c, ns.name)
                for path in paths:
                    if path.startswith("labels."):
                        key = path.removeprefix("labels.")
                        current[key] = wanted.get(key, "")
                    else:
                        raise InvalidArgument(f"cannot update {goquote(path)} field")
                wanted_all = current
            else:
                wanted_all = wanted
            store.set_labels(c, ns.name, wanted_all)
            return store.get_labels(c, ns.name)

        lbls = await self.db.update(job)
        self.exchange.publish(
            _caller_namespace(ns.name),
            "/namespaces/update",
            NamespaceUpdate(name=ns.name, labels=dict(ns.labels)),
        )
        return UpdateNamespaceResponse(namespace=Namespace(name=ns.name, labels=lbls))

    async def delete(self, message: DeleteNamespaceRequest) -> Empty:
        await self.db.update(lambda c: store.delete(c, message.name))
        self.exchange.publish(message.name, "/namespaces/delete", NamespaceDelete(name=message.name))
        return Empty()


def service(ic: plugin.InitContext) -> NamespacesService:
    return NamespacesService(ic.get(plugin.METADATA), ic.get(plugin.EVENT))
