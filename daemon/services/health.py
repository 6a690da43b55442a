"""grpc.health.v1.Health: the daemon as a whole is SERVING once its socket accepts calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pyctr.api._pb.grpc.health.v1 import (
    HealthBase,
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus,
)
from pyctr.api.errdefs import NotFound
from pyctr.daemon import plugin

SERVING = HealthCheckResponseServingStatus.SERVING


class HealthService(HealthBase):
    async def check(self, message: HealthCheckRequest) -> HealthCheckResponse:
        if message.service:
            raise NotFound("unknown service")
        return HealthCheckResponse(status=SERVING)

    async def watch(self, message: HealthCheckRequest) -> AsyncIterator[HealthCheckResponse]:
        if message.service:
            yield HealthCheckResponse(status=HealthCheckResponseServingStatus.SERVICE_UNKNOWN)
        else:
            yield HealthCheckResponse(status=SERVING)
        # The status never changes while the daemon runs; the stream ends when the caller leaves.
        await asyncio.Event().wait()


def service(ic: plugin.InitContext) -> HealthService:
    return HealthService()
