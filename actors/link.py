"""The boundary between the frontend and the engine core: a pair of message channels.

Both ends see the same two calls, ``send`` and ``receive`` (``EndOfChannel`` once the other side is
gone), whatever carries the messages:

- ``memory_link_pair``: trio memory channels, for a core in the same process (tests, small CPU
  setups, a trio program embedding the engine);
- ``SocketLink``: a Unix socket to a core in another process. Each message is pickled (protocol 5)
  behind an 8-byte length. Both ends are this project's own processes, started by the frontend, so
  pickle's trust model holds; the messages are kept to tuples of primitives on the hot path,
  because pickling a record per token costs ten times more (see docs/design.md, "The boundary").
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Protocol

import trio

_HEADER = struct.Struct("<Q")
_MAX_MESSAGE = 1 << 30  # a corrupt length must not make us allocate the moon
_READ_BYTES = 1 << 20  # a socket read: several steps' messages of 256 sequences each


class Link(Protocol):
    async def send(self, message: Any) -> None: ...

    async def receive(self) -> Any: ...

    async def aclose(self) -> None: ...


class MemoryLink:
    def __init__(self, send: trio.MemorySendChannel[Any], receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._send = send
        self._receive = receive

    async def send(self, message: Any) -> None:
        try:
            await self._send.send(message)
        except trio.ClosedResourceError:  # our own end, closed by aclose: the link is gone
            raise trio.BrokenResourceError("the link is closed") from None

    async def receive(self) -> Any:
        try:
            return await self._receive.receive()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_link_pair(capacity: int = 1024) -> tuple[MemoryLink, MemoryLink]:
    """Two connected ends. Bounded: a core that outruns its frontend waits (and coalesces)."""
    a_send, b_receive = trio.open_memory_channel[Any](capacity)
    b_send, a_receive = trio.open_memory_channel[Any](capacity)
    return MemoryLink(a_send, a_receive), MemoryLink(b_send, b_receive)


class SocketLink:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._sending = trio.Lock()  # a stream takes one send_all at a time; several tasks send
        self._buffer = bytearray()
        self._start = 0  # where the unread bytes of _buffer begin

    async def send(self, message: Any) -> None:
        payload = pickle.dumps(message, protocol=5)
        # Uncontended, take the lock without yielding (``async with`` would yield once even then):
        # in an engine core whose device jobs hold the thread, each yield before the write costs
        # the tokens a whole step of delay.
        if self._sending.locked():
            await self._sending.acquire()
        else:
            self._sending.acquire_nowait()
        try:
            await self._stream.send_all(_HEADER.pack(len(payload)) + payload)
        finally:
            self._sending.release()

    async def receive(self) -> Any:
        (size,) = _HEADER.unpack(await self._read(_HEADER.size))
        if size > _MAX_MESSAGE:
            raise trio.BrokenResourceError(f"a message of {size} bytes on the core link: the stream is corrupt")
        return pickle.loads(await self._read(size))

    async def _read(self, size: int) -> bytes:
        # Everything that has arrived is read at once (up to _READ_BYTES), and the messages already
        # here are returned without a yield: a frontend that falls behind its core applies every
        # step waiting in the socket before its request tasks run, so they send one merged frame
        # per request instead of one per step. The read offset moves instead of deleting the front
        # of the buffer, which would copy the rest once per message.
        while len(self._buffer) - self._start < size:
            if self._start:
                del self._buffer[: self._start]
                self._start = 0
            chunk = await self._stream.receive_some(max(_READ_BYTES, size - len(self._buffer)))
            if not chunk:
                raise trio.EndOfChannel
            self._buffer += chunk
        end = self._start + size
        data = bytes(self._buffer[self._start : end])
        self._start = end
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()
