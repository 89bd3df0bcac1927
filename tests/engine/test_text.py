"""`TextStream`: incremental UTF-8 decoding and stop strings across token pieces."""

from __future__ import annotations

import pytest

from llamba_cli.engine.text import TextStream

REPLACEMENT = "\ufffd"


def feed_all(stream: TextStream, pieces: list[bytes]) -> list[bool]:
    results = []
    for piece in pieces:
        results.append(stream.feed(piece))
        if results[-1]:
            break
    return results


def byte_pieces(text: str) -> list[bytes]:
    return [bytes([b]) for b in text.encode("utf-8")]


@pytest.mark.parametrize("char", ["é", "€", "😀", "中"])
def test_multibyte_character_split_at_every_byte(char: str) -> None:
    text = f"a{char}b{char}"
    stream = TextStream()
    assert feed_all(stream, byte_pieces(text)) == [False] * len(text.encode())
    assert stream.close() == text
    assert REPLACEMENT not in stream.close()


def test_multibyte_split_across_uneven_pieces() -> None:
    data = "naïve café — 😀 ok".encode()
    for cut1 in range(1, len(data)):
        for cut2 in range(cut1, len(data)):
            stream = TextStream()
            feed_all(stream, [data[:cut1], data[cut1:cut2], data[cut2:]])
            assert stream.close() == "naïve café — 😀 ok"


def test_no_stop_gives_full_text() -> None:
    stream = TextStream(("STOP",))
    pieces = [b"Hello", b", ", b"wor", b"ld", b"!"]
    assert feed_all(stream, pieces) == [False] * 5
    assert not stream.stopped
    assert stream.close() == "Hello, world!"
    assert stream.close() == "Hello, world!"  # reading twice changes nothing


def test_no_stop_strings_at_all() -> None:
    stream = TextStream()
    feed_all(stream, [b"a\n\n", b"b"])
    assert stream.close() == "a\n\nb"


def test_stop_inside_one_piece() -> None:
    stream = TextStream(("END",))
    assert feed_all(stream, [b"abc", b"dENDef"]) == [False, True]
    assert stream.stopped
    assert stream.close() == "abcd"


@pytest.mark.parametrize(
    ("pieces", "text"),
    [
        ([b"Hello", b"\n", b"\nworld"], "Hello"),
        ([b"abc S", b"TO", b"Pxyz"], "abc "),
        ([b"S", b"T", b"O", b"P"], ""),
        ([b"x", b"STO", b"P"], "x"),
        ([b"xyST", b"OP"], "xy"),
    ],
)
def test_stop_spanning_piece_boundaries(pieces: list[bytes], text: str) -> None:
    stream = TextStream(("STOP", "\n\n"))
    results = feed_all(stream, pieces)
    assert results[-1] is True
    assert results[:-1] == [False] * (len(results) - 1)
    assert stream.close() == text


def test_stop_beginning_in_earlier_text_truncates_it() -> None:
    stream = TextStream(("<|im_end|>",))
    assert feed_all(stream, [b"answer: 42", b"<|", b"im", b"_en", b"d|>", b"more"]) == [
        False,
        False,
        False,
        False,
        True,
    ]
    assert stream.close() == "answer: 42"


def test_stop_beginning_in_earlier_text_then_more_text() -> None:
    stream = TextStream(("</s>",))
    assert feed_all(stream, [b"yes</", b"s>tail"]) == [False, True]
    assert stream.close() == "yes"


def test_partial_stop_that_does_not_complete_stays() -> None:
    stream = TextStream(("<end>",))
    feed_all(stream, [b"a<en", b"d", b"!", b"<e"])
    assert not stream.stopped
    assert stream.close() == "a<end!<e"


@pytest.mark.parametrize("stops", [("world", "lo w"), ("lo w", "world")])
def test_earliest_stop_wins_regardless_of_order(stops: tuple[str, ...]) -> None:
    stream = TextStream(stops)
    assert feed_all(stream, [b"hello world"]) == [True]
    assert stream.close() == "hel"


def test_earliest_stop_wins_across_pieces() -> None:
    # "ab" begins in the earlier piece, "c" completes first in the new one but later.
    stream = TextStream(("c", "abc", "bx"))
    assert feed_all(stream, [b"zzab", b"c"]) == [False, True]
    assert stream.close() == "zz"


def test_longer_stop_starting_earlier_beats_shorter_one() -> None:
    stream = TextStream(("###", "#\n"))
    assert feed_all(stream, [b"a##", b"#\n"]) == [False, True]
    assert stream.close() == "a"


def test_stop_string_with_multibyte_character_split() -> None:
    stream = TextStream(("€",))
    assert feed_all(stream, [b"cost: 5\xe2", b"\x82", b"\xac more"]) == [False, False, True]
    assert stream.close() == "cost: 5"


def test_bytes_pending_after_a_stop_are_dropped() -> None:
    stream = TextStream(("x",))
    assert feed_all(stream, [b"abx\xe2\x82"]) == [True]
    assert stream.close() == "ab"


def test_incomplete_sequence_becomes_replacement_only_at_the_end() -> None:
    stream = TextStream(("zz",))
    assert feed_all(stream, [b"ab", b"\xe2\x82"]) == [False, False]
    assert stream.close() == "ab" + REPLACEMENT


def test_incomplete_then_completed_is_not_replaced() -> None:
    stream = TextStream()
    feed_all(stream, [b"\xf0", b"\x9f\x98", b"\x80", b"!"])
    assert stream.close() == "😀!"


def test_invalid_byte_in_the_middle_is_replaced_once() -> None:
    stream = TextStream()
    feed_all(stream, [b"a\xff", b"b"])
    assert stream.close() == "a" + REPLACEMENT + "b"


def test_empty_pieces_are_harmless() -> None:
    stream = TextStream(("ab",))
    assert feed_all(stream, [b"", b"a", b"", b"b"]) == [False, False, False, True]
    assert stream.close() == ""
