"""The netstring codec alone (socketmap_table(5) framing), no sockets: frames, limits, typed errors.

tests/test_socketmap.py drives the same rules through a real daemon.
"""

from __future__ import annotations

import pytest

from mtasts_policyd.frontends.netstring import (
    BadTerminator,
    FrameError,
    MalformedLength,
    NetstringDecoder,
    TooLong,
    decode_one,
    encode,
)


def test_encode_counts_utf8_bytes():
    assert encode("postfix example.com") == b"19:postfix example.com,"
    assert encode("") == b"0:,"
    assert encode("é") == b"2:\xc3\xa9,"


def test_frames_arrive_in_any_pieces_and_in_order():
    stream = encode("postfix a.example") + encode("") + encode("postfix b.example")
    decoder = NetstringDecoder()
    frames: list[bytes] = []
    for i in range(len(stream)):  # one byte at a time: every split point
        decoder.feed(stream[i:i + 1])
        frames += decoder.frames(100)
    assert frames == [b"postfix a.example", b"", b"postfix b.example"]
    assert len(decoder) == 0


def test_incomplete_frame_waits_and_counts_its_bytes():
    decoder = NetstringDecoder()
    decoder.feed(b"19:postfix exa")
    assert list(decoder.frames(100)) == []
    assert len(decoder) == len(b"19:postfix exa")
    decoder.feed(b"mple.com,7:post")
    assert list(decoder.frames(100)) == [b"postfix example.com"]
    assert len(decoder) == len(b"7:post")


def test_caller_may_stop_at_any_frame_and_resume():
    # Back-pressure: the socketmap protocol stops taking requests while its queue is full.
    decoder = NetstringDecoder()
    decoder.feed(encode("one") + encode("two") + encode("three"))
    frames = decoder.frames(100)
    assert next(frames) == b"one"
    del frames
    assert list(decoder.frames(100)) == [b"two", b"three"]


@pytest.mark.parametrize("data", [b"x", b"12a:", b":abc,", b"-1:", b" 3:abc,", b"1234567"])
def test_malformed_length(data):
    decoder = NetstringDecoder()
    decoder.feed(data)
    with pytest.raises(MalformedLength, match="^malformed netstring length$"):
        list(decoder.frames(10000))


def test_length_still_arriving_is_not_an_error():
    decoder = NetstringDecoder()
    decoder.feed(b"12345")
    assert list(decoder.frames(10000)) == []


def test_too_long_is_refused_before_the_bytes_arrive():
    decoder = NetstringDecoder()
    decoder.feed(b"10001:")
    with pytest.raises(TooLong, match="^request longer than 10000 bytes$") as caught:
        list(decoder.frames(10000))
    assert caught.value.limit == 10000
    decoder = NetstringDecoder()
    decoder.feed(encode("x" * 10000))
    assert list(decoder.frames(10000)) == [b"x" * 10000]


def test_limits_above_six_digits_take_seven_digit_lengths():
    # socketmap.max_request may be up to 1048576: its lengths need seven digits.
    decoder = NetstringDecoder()
    decoder.feed(b"1000000:")
    assert list(decoder.frames(1_048_576)) == []
    decoder = NetstringDecoder()
    decoder.feed(b"1048577:")
    with pytest.raises(TooLong):
        list(decoder.frames(1_048_576))


def test_bad_terminator():
    decoder = NetstringDecoder()
    decoder.feed(b"3:abc;")
    with pytest.raises(BadTerminator, match="^netstring not terminated by ','$"):
        list(decoder.frames(100))


def test_frames_before_a_broken_one_are_delivered():
    decoder = NetstringDecoder()
    decoder.feed(encode("good") + b"3:abc;")
    frames = decoder.frames(100)
    assert next(frames) == b"good"
    with pytest.raises(FrameError):
        next(frames)


def test_decode_one():
    assert decode_one(b"9:NOTFOUND ,", 100) == b"NOTFOUND "
    assert decode_one(b"9:NOTFO", 100) is None
    with pytest.raises(FrameError):
        decode_one(b"error line\n", 100)
