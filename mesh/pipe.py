"""Pipes: a hop's unary calls carried as messages of one long-lived bidirectional stream.

A ``grpc.aio`` unary call costs both processes a round of call set-up: a new HTTP/2
stream, metadata, the completion-queue work of several operations and the client and
server interceptors. A message on a stream already open costs a fraction of that
(measured in docs/performance.md). A pipe keeps what a call means and changes only how it
travels:

* :class:`PipeStub` stands where a generated ``*Stub`` stands (``await
  stub.Method(request, timeout=s)``) and raises what a unary call raises
  (:class:`grpc.aio.AioRpcError` with the server's status code, details and trailing
  metadata), so :class:`~mesh.client.Downstream`'s guards (bulkhead, breaker, retry
  budget) and every caller's fallbacks stay as they are. Each call still gets its own
  timeout from the request's budget, its own CLIENT span and the request's tenant and
  request id (:mod:`mesh.calls`), sent in the message.
* :class:`PipeServicer` (``recmesh.mesh.v1.PipeService/Exchange``, mounted by
  :class:`~mesh.server.MeshServer`) runs each message as its own task through the same
  :class:`~mesh.handling.MethodHandling` a unary call of that method gets: tenant rule
  under mTLS (the stream's peer certificate), budget, SERVER span, fault flags, error
  mapping, metrics. It enforces each call's deadline itself (gRPC does it for unary calls).

Failure semantics: a stream that breaks (the server restarted, the connection dropped)
fails every call in flight on it with ``UNAVAILABLE``; the next call opens a new stream,
which gRPC's channel reconnects as it would for a unary call. A caller that gives up on a
call (timeout, cancellation) tells the server, which cancels the call's task. A server
that drains answers ``UNAVAILABLE`` to any call that arrives after the drain began and
ends its streams once their calls in flight are answered, so callers move to a new stream
(on another replica, where there is one).

One stream per channel: every call of a client to one server travels on one HTTP/2
connection, as unary calls on one channel already do.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from recmesh.mesh.v1 import pipe_pb2, pipe_pb2_grpc

from mesh.calls import attempt, call_timeout
from mesh.context import outgoing_metadata
from mesh.faults import FaultInjector
from mesh.handling import CallFailed, MethodHandling
from mesh.service import Registration
from mesh.settings import ServerSettings
from mesh.tls import peer_identity

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}

SERVICE_NAME = pipe_pb2.DESCRIPTOR.services_by_name["PipeService"].full_name


def _status(
    code: grpc.StatusCode, details: str, trailing: Iterable[tuple[str, str]] = ()
) -> grpc.aio.AioRpcError:
    """The error a unary call with this outcome would have raised."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


def service_of(stub_factory: Callable[..., Any]) -> str:
    """The full name of the service a generated stub class calls: the package of its module
    (``recmesh.feature.v1.feature_pb2_grpc`` → ``recmesh.feature.v1``, packages follow their
    directories) and the class's name without ``Stub``."""
    package = stub_factory.__module__.rpartition(".")[0]
    return f"{package}.{stub_factory.__name__.removesuffix('Stub')}"


class _Stream:
    """One open Exchange stream, its calls in flight and the task reading its answers.

    Messages go out through a queue that gRPC's own writer consumes, never by awaiting a
    write in a caller's task: a caller cancelled in the middle of a write would leave the
    stream unable to take another (gRPC: TOO_MANY_OPERATIONS).
    """

    def __init__(self, exchange: Callable[[AsyncIterator[pipe_pb2.ExchangeRequest]], Any]) -> None:
        self._outgoing: asyncio.Queue[pipe_pb2.ExchangeRequest | None] = asyncio.Queue()
        self.call = exchange(self._requests())
        self.pending: dict[int, asyncio.Future[pipe_pb2.ExchangeResponse]] = {}
        self.closed = False
        # The reader serves no request: it runs in an empty context, not the first caller's.
        self.reader = asyncio.get_running_loop().create_task(
            self._read(), context=contextvars.Context()
        )

    async def _requests(self) -> AsyncIterator[pipe_pb2.ExchangeRequest]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    def send(self, message: pipe_pb2.ExchangeRequest) -> None:
        """Queue ``message`` for the stream (returns at once)."""
        self._outgoing.put_nowait(message)

    def end(self) -> None:
        """Half-close: no message after the ones queued."""
        self._outgoing.put_nowait(None)

    async def _read(self) -> None:
        reason = "the server ended the stream"
        try:
            async for reply in self.call:
                answer = self.pending.get(reply.id)
                if answer is not None and not answer.done():
                    answer.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "the stream was cancelled"
        finally:
            self.closed = True
            self.end()
            for answer in self.pending.values():
                if not answer.done():
                    answer.set_exception(
                        _status(grpc.StatusCode.UNAVAILABLE, f"pipe lost: {reason}")
                    )


class PipeStub:
    """Calls the unary methods of ``service`` (full name) through one Exchange stream over
    ``channel`` (see the module docstring); ``target`` names the server in spans.

    ``stub.Method(request, timeout=None)`` returns an awaitable of the response message.
    """

    def __init__(self, channel: grpc.aio.Channel, service: str, target: str) -> None:
        self._exchange = pipe_pb2_grpc.PipeServiceStub(channel).Exchange
        self._service = service
        self._target = target
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {}

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        method = self._methods.get(name)
        if method is None:
            found = descriptor_pool.Default().FindMethodByName(f"{self._service}.{name}")
            output: type[Message] = message_factory.GetMessageClass(found.output_type)
            path = f"/{self._service}/{name}"

            def method(request: Message, timeout: float | None = None) -> Awaitable[Any]:
                return self._call(path, output, request, timeout)

            self._methods[name] = method
        return method

    async def _call(
        self, path: str, output: type[Message], request: Message, cap_s: float | None
    ) -> Any:
        timeout = call_timeout(cap_s)
        with attempt(path, self._target, timeout) as current:
            metadata = dict(outgoing_metadata())  # tenant, request id
            metadata.update(current.carrier)
            call_id = next(self._ids)
            message = pipe_pb2.ExchangeRequest(
                id=call_id,
                method=path,
                payload=request.SerializeToString(),
                timeout_s=timeout,
                metadata=metadata,
            )
            stream, answer = self._send(message, call_id)
            try:
                async with asyncio.timeout(timeout):
                    reply = await answer
            except TimeoutError:
                self._forget(stream, call_id)
                raise _status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except asyncio.CancelledError:
                self._forget(stream, call_id)
                raise
            finally:
                stream.pending.pop(call_id, None)
            if reply.code:
                raise _status(
                    _CODES.get(reply.code, grpc.StatusCode.UNKNOWN),
                    reply.details,
                    reply.trailing_metadata.items(),
                )
            return output.FromString(reply.payload)

    def _send(
        self, message: pipe_pb2.ExchangeRequest, call_id: int
    ) -> tuple[_Stream, asyncio.Future[pipe_pb2.ExchangeResponse]]:
        """Queue ``message`` on the open stream (opening one if there is none) with its
        answer registered; the stream and the answer to await."""
        stream = self._stream
        if stream is None or stream.closed:
            stream = self._stream = _Stream(self._exchange)
        answer: asyncio.Future[pipe_pb2.ExchangeResponse] = (
            asyncio.get_running_loop().create_future()
        )
        stream.pending[call_id] = answer
        stream.send(message)
        return stream, answer

    def _forget(self, stream: _Stream, call_id: int) -> None:
        """Tell the server the caller gave up on ``call_id``."""
        if not stream.closed:
            stream.send(pipe_pb2.ExchangeRequest(id=call_id, cancel=True))

    async def close(self) -> None:
        """End the open stream; calls in flight on it fail with UNAVAILABLE."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.end()
            stream.call.cancel()
            await asyncio.gather(stream.reader, return_exceptions=True)


_Method = tuple[MethodHandling, Callable[[Any, Any], Awaitable[Message]]]


class _PipeContext:
    """What a handler may ask of its context when its call came through a pipe."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


class PipeServicer:
    """Serves the unary methods of ``registrations`` through Exchange streams.

    Args:
        registrations: the servicers whose unary methods a pipe may call.
        settings / faults / secure: as the server's interceptor gets them.
        max_in_flight: calls one stream may have running; more are refused with
            RESOURCE_EXHAUSTED (the stream stays open).
    """

    def __init__(
        self,
        registrations: Iterable[Registration],
        settings: ServerSettings,
        faults: FaultInjector,
        *,
        secure: bool,
        max_in_flight: int,
    ) -> None:
        self._methods: dict[str, _Method] = {}
        pool = descriptor_pool.Default()
        for registration in registrations:
            service = pool.FindServiceByName(registration.full_name)
            for method in service.methods:
                if method.client_streaming or method.server_streaming:
                    continue
                path = f"/{registration.full_name}/{method.name}"
                request_type = message_factory.GetMessageClass(method.input_type)
                handling = MethodHandling(
                    path, settings, faults, secure=secure, deserialize=request_type.FromString
                )
                self._methods[path] = (handling, getattr(registration.servicer, method.name))
        self._max_in_flight = max_in_flight
        self._draining = False

    def drain(self) -> None:
        """Refuse calls that arrive from now on (UNAVAILABLE) and end each stream once its
        calls in flight are answered."""
        self._draining = True

    def handler(self) -> grpc.GenericRpcHandler:
        """``recmesh.mesh.v1.PipeService/Exchange`` to add to a server. Its messages are
        decoded here: a corrupt one is answered INVALID_ARGUMENT (id 0) and skipped."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Exchange": grpc.stream_stream_rpc_method_handler(
                    self.exchange,
                    request_deserializer=None,
                    response_serializer=pipe_pb2.ExchangeResponse.SerializeToString,
                )
            },
        )

    async def exchange(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pipe_pb2.ExchangeResponse]:
        """Serve the calls of one stream until the caller ends it or the server drains.

        A task reads the calls and starts one task per call; answers go through a queue
        that this generator yields to gRPC, so no write is ever awaited by a task that a
        cancel message or a deadline may cancel (gRPC cannot take a write after one was
        cut short: TOO_MANY_OPERATIONS)."""
        identity = peer_identity(context)
        handler_context = _PipeContext(str(context.peer() or ""))
        replies: asyncio.Queue[pipe_pb2.ExchangeResponse | None] = asyncio.Queue()
        answer = replies.put_nowait
        running: dict[int, asyncio.Task[None]] = {}

        async def serve(message: pipe_pb2.ExchangeRequest, method: _Method) -> None:
            handling, handler = method
            seconds = handling.budget_s(message.timeout_s if message.timeout_s > 0 else None)
            try:
                async with asyncio.timeout(seconds):
                    response = await handling.run(
                        message.metadata,
                        seconds,
                        lambda: identity,
                        message.payload,
                        lambda request: handler(request, handler_context),
                    )
                reply = pipe_pb2.ExchangeResponse(
                    id=message.id, payload=response.SerializeToString()
                )
            except CallFailed as failed:
                reply = pipe_pb2.ExchangeResponse(
                    id=message.id,
                    code=failed.code.value[0],
                    details=failed.details,
                    trailing_metadata=dict(failed.trailing),
                )
            except TimeoutError:
                reply = _refusal(message.id, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            answer(reply)

        def dispatch(message: pipe_pb2.ExchangeRequest) -> None:
            method = self._methods.get(message.method)
            if method is None:
                answer(
                    _refusal(
                        message.id,
                        grpc.StatusCode.UNIMPLEMENTED,
                        f"no unary method {message.method[:200]!r} here",
                    )
                )
            elif len(running) >= self._max_in_flight:
                answer(
                    _refusal(
                        message.id,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{len(running)} calls in flight on this pipe",
                    )
                )
            else:
                task = asyncio.create_task(serve(message, method))
                running[message.id] = task
                task.add_done_callback(functools.partial(_finished, running, message.id))

        async def read() -> None:
            try:
                async for raw in request_iterator:
                    try:
                        message = pipe_pb2.ExchangeRequest.FromString(raw)
                    except DecodeError as exc:
                        # No call to fail (its id is in the corrupt bytes): answered as id
                        # 0, and the stream goes on. (Ending it here would race the
                        # caller's next writes, which gRPC's client turns into INTERNAL.)
                        answer(
                            _refusal(
                                0,
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"not an ExchangeRequest: {exc}",
                            )
                        )
                        continue
                    if message.cancel:
                        if (task := running.get(message.id)) is not None:
                            task.cancel()
                    elif self._draining:
                        answer(_refusal(message.id, grpc.StatusCode.UNAVAILABLE, "draining"))
                        break
                    else:
                        dispatch(message)
                if running:
                    await asyncio.gather(*running.values(), return_exceptions=True)
            finally:
                for task in running.values():
                    task.cancel()
                answer(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()


def _finished(running: dict[int, asyncio.Task[None]], call_id: int, _: object) -> None:
    running.pop(call_id, None)


def _refusal(call_id: int, code: grpc.StatusCode, details: str) -> pipe_pb2.ExchangeResponse:
    return pipe_pb2.ExchangeResponse(id=call_id, code=code.value[0], details=details)
