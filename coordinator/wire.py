"""Requests whose bytes are not a valid protobuf message of the RPC's request type.

grpc parses a request before any handler runs, and answers a parse failure with UNKNOWN
("Unexpected DecodeError"), as if the server had crashed. `ParseErrors` wraps every method's
deserializer so that such a request reaches the handler as an `Unparsable` marker instead, and the
call is answered with INVALID_ARGUMENT naming the message type, before the handler sees anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class Unparsable:
    """Stands in for a request that failed to parse; carries the reason for the status message."""

    def __init__(self, message: str) -> None:
        self.message = message


def _parser(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    what = deserialize.__self__.DESCRIPTOR.full_name  # the generated stubs pass Message.FromString

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Unparsable(f"request of {len(data)} bytes is not a valid {what} message: {exc}")

    return parse


async def _refuse(context: grpc.aio.ServicerContext, request: Unparsable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = _parser(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        inner_uu: Callable[..., Awaitable[Any]] = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Unparsable):
                await _refuse(context, request)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, parse, serialize)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Unparsable):
                await _refuse(context, request)
            replies = inner_us(request, context)
            try:
                async for reply in replies:
                    yield reply
            finally:  # a cancelled call closes the handler's stream now, running its cleanup
                await replies.aclose()

        return grpc.unary_stream_rpc_method_handler(unary_stream, parse, serialize)

    async def parsed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Unparsable):
                await _refuse(context, request)
            yield request

    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await inner_su(parsed(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, parse, serialize)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        replies = inner_ss(parsed(requests, context), context)
        try:
            async for reply in replies:
                yield reply
        finally:
            await replies.aclose()

    return grpc.stream_stream_rpc_method_handler(stream_stream, parse, serialize)


class ParseErrors(grpc.aio.ServerInterceptor):
    """Answers unparsable requests with INVALID_ARGUMENT instead of grpc's UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return None if handler is None else _guard(handler)
