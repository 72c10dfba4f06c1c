"""A request that is not a valid protobuf message gets INVALID_ARGUMENT, not UNKNOWN.

gRPC parses a request before the servicer runs; a parse failure there surfaces to the caller as UNKNOWN ("Unexpected
DecodeError") and is logged with a traceback. :class:`DecodeGuard` wraps each unary request's deserializer so the
bytes that do not parse reach the handler as a marker, and the handler refuses them with one clear line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)


class _Undecodable:
    def __init__(self, error: str) -> None:
        self.error = error


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Refuse undecodable unary requests (unary-unary and unary-stream methods) with INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method: str = handler_call_details.method
        deserialize: Callable[[bytes], Any] = handler.request_deserializer

        def decode(raw: bytes) -> Any:
            try:
                return deserialize(raw)
            except Exception as e:  # google.protobuf.message.DecodeError and kin: the bytes are the caller's fault
                return _Undecodable(type(e).__name__)

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            log.warning("[DecodeGuard] %s: request does not parse (%s)", method, request.error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{method.rsplit('/', 1)[-1]}: the request is not a valid protobuf message of its type")

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for item in inner_stream(request, context):
                    yield item

            return handler._replace(request_deserializer=decode, unary_stream=unary_stream)
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await inner(request, context)

        return handler._replace(request_deserializer=decode, unary_unary=unary_unary)
