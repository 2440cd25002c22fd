"""Mask codecs: every layout round-trips any mask exactly, and corrupt payloads are refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raydiff.kernel.masks import (
    CODEC_EMPTY,
    CODEC_GAPS,
    CODEC_PACKBITS,
    CODEC_ZSTD,
    GAPS_BELOW,
    RAW_FROM,
    decode_mask,
    decode_packed,
    encode_mask,
    encode_packed,
)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5000), density=st.sampled_from([0.0, 0.0005, 0.01, 0.05, 0.08, 0.2, 0.7, 1.0]),
       runs=st.lists(st.tuples(st.integers(0, 4999), st.integers(0, 1200)), max_size=3), seed=st.integers(0, 2**31))
def test_any_mask_round_trips_through_the_codec_chosen_for_it(n, density, runs, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(n) < density
    for start, length in runs:  # long gaps (≥ 255, several escapes) and long changed runs
        mask[start:start + length] = not mask[start % n]
    codec, payload = encode_mask(mask)
    changed = int(mask.sum())
    if changed == 0:
        assert codec == CODEC_EMPTY
    elif changed * GAPS_BELOW < ((n + 7) // 8) * 8:
        assert codec == CODEC_GAPS
    else:
        assert codec in (CODEC_ZSTD, CODEC_PACKBITS)
    got = decode_mask(codec, payload, n)
    np.testing.assert_array_equal(got, mask)
    np.testing.assert_array_equal(decode_packed(codec, payload, n), np.packbits(mask, bitorder="little"))


@pytest.mark.parametrize(("changed", "codec"), [
    (0, CODEC_EMPTY),
    (1, CODEC_GAPS),
    (7_999, CODEC_GAPS),  # 7,999 · 12 < 96,000: gaps below one in GAPS_BELOW
    (8_000, CODEC_ZSTD),
    (19_199, CODEC_ZSTD),
    (19_200, CODEC_PACKBITS),  # RAW_FROM · 96,000: raw from 20 % …
    (76_800, CODEC_PACKBITS),  # … to 80 %
    (76_801, CODEC_ZSTD),
    (96_000, CODEC_ZSTD),
])
def test_the_codec_follows_the_documented_density_rule(changed, codec):
    """The module's table: gaps below 1 in 12, raw packbits from 20 % to 80 % changed, zstd
    elsewhere — at each boundary exactly (a random mask at these densities compresses)."""
    assert GAPS_BELOW == 12 and RAW_FROM == 0.2
    n = 96_000
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(changed).permutation(n)[:changed]] = True
    for got, payload in (encode_mask(mask), encode_packed(np.packbits(mask, bitorder="little"), changed)):
        assert got == codec and type(payload) is bytes  # a Parquet binary value, not a pyarrow Buffer
        assert (payload == b"") == (codec == CODEC_EMPTY)
        assert (decode_mask(got, payload, n) == mask).all()
        if codec == CODEC_PACKBITS:
            assert payload == np.packbits(mask, bitorder="little").tobytes()


def test_every_small_mask_size_round_trips():
    """Masks of 1 to 400 elements at several counts, every size once: the encoder's buffers
    are sized from the packed length, and a mistake there shows only at some lengths (a
    stream buffer of `size ^ 8` bytes is 0 bytes for an 8-byte mask)."""
    rng = np.random.default_rng(7)
    for n in range(1, 401):
        for changed in sorted({1, 2, max(1, n // 13), n // 5, n // 2, n - 1, n}):
            mask = np.zeros(n, bool)
            mask[rng.permutation(n)[:changed]] = True
            codec, payload = encode_mask(mask)
            assert (decode_mask(codec, payload, n) == mask).all(), (n, changed, codec)


def test_a_mask_zstd_cannot_shrink_is_stored_raw():
    # 2 of 16 changed: neither gaps (2 · 12 ≥ 16) nor the raw range, and a zstd frame of
    # two bytes is longer than the two bytes themselves.
    mask = np.zeros(16, bool)
    mask[[3, 11]] = True
    assert encode_mask(mask) == (CODEC_PACKBITS, np.packbits(mask, bitorder="little").tobytes())


def test_gaps_layout_is_the_documented_byte_stream():
    n = 1000
    mask = np.zeros(n, bool)
    mask[[0, 3, 300, 999]] = True  # gaps 0, 2, 296 = 255 + 41, 698 = 2·255 + 188
    codec, payload = encode_mask(mask)
    assert codec == CODEC_GAPS
    size = int(np.frombuffer(payload[:8], "<u8")[0])
    stream = pa.Codec("zstd").decompress(payload[8:], decompressed_size=size, asbytes=True)
    assert list(stream) == [0, 2, 255, 41, 255, 255, 188]


@pytest.mark.parametrize("damage", ["short", "size", "past_end", "far_past_end", "dangling"])
def test_corrupt_gaps_payloads_are_refused(damage):
    n = 1000
    zstd = pa.Codec("zstd", compression_level=1)

    def payload(stream: list[int]) -> bytes:
        return np.array([len(stream)], "<u8").tobytes() + zstd.compress(bytes(stream), asbytes=True)

    bad = {
        "short": b"\x01\x02",  # not even the length
        "size": np.array([10**9], "<u8").tobytes() + zstd.compress(b"\x00", asbytes=True),  # impossible length
        "past_end": payload([255, 255, 255, 235]),  # element 1000 of a 1000-element mask
        # element 1120, past the packed bytes themselves: a check for position == n alone
        # would let the decoder write beyond its buffer (numba checks no bounds)
        "far_past_end": payload([255, 255, 255, 255, 100]),
        "dangling": payload([0, 255]),  # a run of 255s with no final byte
    }[damage]
    with pytest.raises(ValueError, match="gaps mask payload"):  # ours, not numpy's or zstd's
        decode_mask(CODEC_GAPS, bad, n)


def test_unknown_codecs_and_payloads_of_the_wrong_size_are_refused():
    # Names sorting before, between and after the known ones (a range compare would take them).
    for codec in ("aaa", "gaps", "packbits+lz4", "zzz"):
        with pytest.raises(ValueError, match="unknown mask codec"):
            decode_mask(codec, b"\x00" * 2, 16)
    mask = np.arange(100) % 3 == 0  # 34 of 100: packbits
    codec, payload = encode_mask(mask)
    assert codec == CODEC_PACKBITS and len(payload) == 13
    for bad in (payload[:-1], payload + b"\x00"):  # a short one would decode with zeros padded
        with pytest.raises(ValueError, match=f"holds {len(bad)} bytes, expected 13"):
            decode_mask(codec, bad, 100)


def test_declared_stream_sizes_at_the_decoders_bounds():
    """A gaps stream is at most n bytes (a byte per set bit, plus one per 255 of gap): the
    longest, every bit set, decodes; a declared size of 0, or one past the decoder's bound
    (n + n // 255 + 1), is refused before zstd or the decoder see it."""
    from raydiff.kernel import _gaps

    n = 1000
    zstd = pa.Codec("zstd", compression_level=1)
    full = np.packbits(np.ones(n, bool), bitorder="little")
    stream = np.zeros(n + n // 255 + 1, np.uint8)
    k = _gaps.encode(full, stream)
    assert k == n
    longest = np.array([k], "<u8").tobytes() + zstd.compress(stream[:k].tobytes(), asbytes=True)
    assert decode_mask(CODEC_GAPS, longest, n).all()
    for size in (0, n + n // 255 + 2):
        bad = np.array([size], "<u8").tobytes() + zstd.compress(bytes(size), asbytes=True)
        with pytest.raises(ValueError, match=f"declares {size} stream bytes"):
            decode_mask(CODEC_GAPS, bad, n)


@pytest.mark.parametrize("tail", [False, True])
def test_gaps_at_and_around_multiples_of_255_are_written_and_read_exactly(tail):
    """Gaps of 254, 255, 256, 509 (= 255 + 254), 510 and 65,280 (= 255·256) are the ones an
    escape-byte codec gets wrong; each is written as ``gap // 255`` bytes of 255 and one byte
    ``gap % 255``. 509 is the one whose escape loop must stop one short of a final 254 (a
    mutation run's survivor: the loop's ``gap >= 254`` for ``>= 255`` passed the others). With
    ``tail`` the mask ends in 7 bytes after its last whole 8-byte word, where the last two
    set bits are (the encoder walks those bytes by a loop of its own)."""
    gaps = [0, 254, 255, 256, 509, 510, 65_280, 1, 255]
    pos = list(np.cumsum(np.array(gaps) + 1) - 1)
    if tail:
        words = pos[-1] // 64 + 2
        p1 = 64 * words + 2  # in the trailing bytes, 41 apart
        gaps += [p1 - pos[-1] - 1, 40]
        pos += [p1, p1 + 41]
        n = 64 * words + 50
        assert (n + 7) // 8 == 8 * words + 7
    else:
        n = pos[-1] + 1 + 64 * 8 + (-(pos[-1] + 1)) % 64
    mask = np.zeros(n, bool)
    mask[pos] = True
    codec, payload = encode_mask(mask)
    assert codec == CODEC_GAPS
    size = int(np.frombuffer(payload[:8], "<u8")[0])
    stream = pa.Codec("zstd").decompress(payload[8:], decompressed_size=size, asbytes=True)
    expected = [b for g in gaps for b in [255] * (g // 255) + [g % 255]]
    assert list(stream) == expected
    np.testing.assert_array_equal(decode_mask(codec, payload, n), mask)


def test_a_chunk_whose_every_bit_is_set_fits_the_encoders_buffers():
    """The encoder gathers a chunk's set-bit positions in a buffer sized for a chunk whose
    every bit is set; compiled again with bounds checks, an index past it raises instead of
    writing past it unseen (mutation testing found a smaller buffer survived every test)."""
    from numba import njit

    from raydiff.kernel import _gaps

    checked = njit(boundscheck=True)(_gaps.encode.py_func)
    full = _gaps._CHUNK * 64
    n = 3 * full + 13
    mask = np.zeros(n, bool)
    mask[full:2 * full] = True  # the second chunk: every bit
    mask[-5] = True  # and the tail bytes
    packed = np.packbits(mask, bitorder="little")
    out = np.zeros(n + n // 255 + 1, np.uint8)
    k = checked(packed, out)
    fast = np.zeros_like(out)
    assert _gaps.encode(packed, fast) == k and (fast[:k] == out[:k]).all()
    back = np.zeros_like(packed)
    assert _gaps.decode(out[:k], n, back) == int(mask.sum())
    assert (np.unpackbits(back, count=n, bitorder="little").view(bool) == mask).all()


def test_codec_names_read_back_from_a_file_are_recognised():
    """A codec name read from Parquet is a new string, not the module's constant: decoding
    compares names by value (a mutant comparing by identity survived every other test)."""
    rng = np.random.default_rng(5)
    for density in (0.0, 0.01, 0.3, 0.97):
        mask = rng.random(4099) < density
        codec, payload = encode_mask(mask)
        fresh = "".join(list(codec))  # the same name, another object
        assert fresh == codec
        assert (decode_mask(fresh, payload, mask.size) == mask).all(), codec
