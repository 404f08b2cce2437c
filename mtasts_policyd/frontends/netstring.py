"""Netstrings (https://cr.yp.to/proto/netstrings.txt, socketmap_table(5)): `LENGTH:BYTES,`.

The codec alone, no I/O: the socketmap protocol feeds it what the socket gave and takes complete
frames; `doctor` reads the daemon's replies with it. A stream that breaks the framing raises a
`FrameError` naming how; nothing after it can be trusted, so the caller closes the connection.
"""

from __future__ import annotations

from collections.abc import Iterator

# Digits of the length field accepted at least (Postfix's own limit, socketmap_max_reply_size,
# is far below 10**6); more when the configured maximum needs them.
MAX_LENGTH_DIGITS = 6


def encode(text: str) -> bytes:
    """One frame: the UTF-8 bytes of `text`, with their length in front and ',' behind."""
    data = text.encode("utf-8")
    return b"%d:%s," % (len(data), data)


class FrameError(ValueError):
    """The bytes are not (or no longer) netstrings; str() is the reason told to the client."""


class MalformedLength(FrameError):
    def __init__(self) -> None:
        super().__init__("malformed netstring length")


class TooLong(FrameError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request longer than {limit} bytes")
        self.limit = limit


class BadTerminator(FrameError):
    def __init__(self) -> None:
        super().__init__("netstring not terminated by ','")


class NetstringDecoder:
    """Incremental: `feed` bytes as they arrive, then take the complete frames from `frames`.

    A frame is taken from the buffer as it is yielded, so a caller may stop iterating at any
    frame (back-pressure) and resume later with the rest still buffered. `len()` is the number of
    bytes of an incomplete frame waiting for the rest.
    """

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray()

    def __len__(self) -> int:
        return len(self.buffer)

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def frames(self, max_length: int) -> Iterator[bytes]:
        """The complete frames buffered, in order; FrameError where the framing breaks (the length
        is not digits, exceeds `max_length`, or the frame does not end with ',')."""
        buffer = self.buffer
        digits_max = max(MAX_LENGTH_DIGITS, len(str(max_length)))
        while buffer:
            colon = buffer.find(b":", 0, digits_max + 1)
            if colon < 0:
                if len(buffer) > digits_max or not buffer.isdigit():
                    raise MalformedLength()
                return  # the length is still arriving
            digits = bytes(buffer[:colon])
            if not digits.isdigit():
                raise MalformedLength()
            length = int(digits)
            if length > max_length:
                raise TooLong(max_length)
            end = colon + 1 + length
            if len(buffer) <= end:
                return  # wait for the rest
            if buffer[end] != 0x2C:  # ','
                raise BadTerminator()
            frame = bytes(buffer[colon + 1:end])
            del buffer[:end + 1]
            yield frame


def decode_one(data: bytes, max_length: int) -> bytes | None:
    """The first frame of `data` if it is complete, None if more bytes are needed; FrameError if
    `data` does not start with a netstring. For a client that reads one reply."""
    decoder = NetstringDecoder()
    decoder.feed(data)
    return next(decoder.frames(max_length), None)
