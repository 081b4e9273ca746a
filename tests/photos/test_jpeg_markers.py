"""Reading a JPEG's marker stream before decoding (photos/jpeg_markers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from photos import jpeg_markers
from photos.jpeg_markers import MAX_APP_SEGMENTS, MAX_SCANS, MAX_SEGMENTS, read_layout
from tests.photos import bombs
from tests.photos import intake_corpus as corpus
from tests.photos_factory import encode, face_image, face_jpeg, portrait


def test_a_camera_jpeg_is_one_complete_scan():
    layout = read_layout(corpus.jpeg_with_orientation(face_image(), 6))
    assert (layout.progressive, layout.scans, layout.app_segments) == (False, 1, 2)  # JFIF and EXIF
    assert layout.components == (1, 2, 3) and layout.sampling == ((2, 2), (1, 1), (1, 1))
    assert layout.complete_marker_stream and not layout.missing_scans()
    assert not layout.too_many_segments


@pytest.mark.parametrize(("mode", "scans"), [("RGB", 10), ("L", 6)])
def test_a_progressive_jpeg_has_libjpegs_standard_scans_and_all_of_them(mode, scans):
    layout = read_layout(encode(portrait().convert(mode), "JPEG", progressive=True))
    assert layout.progressive and layout.scans == scans
    assert not layout.missing_scans()


def test_restart_markers_and_stuffed_bytes_inside_a_scan_are_not_markers():
    data = encode(portrait(), "JPEG", quality=95, restart_marker_blocks=4)
    assert data.count(b"\xff\xd0") > 10 and b"\xff\x00" in data
    layout = read_layout(data)
    assert layout.scans == 1 and layout.complete_marker_stream


def test_only_the_first_picture_of_an_mpo_is_read():
    layout = read_layout(corpus.mpo_jpeg())
    assert layout.scans == 1 and layout.complete_marker_stream


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_a_progressive_jpeg_closed_early_is_missing_scans(fraction):
    assert read_layout(bombs.cut_with_end_marker(bombs.progressive_selfie(), fraction)).missing_scans()


def test_a_sequential_jpeg_without_a_components_scan_is_missing_scans():
    """Components in separate scans (non-interleaved); closing the file after the first leaves two."""
    data = encode(portrait(), "JPEG", quality=90)
    layout = read_layout(data)
    # Rewrite the one interleaved scan header to carry the first component only.
    start = data.index(b"\xff\xda")
    header = bytes([0xFF, 0xDA, 0x00, 0x08, 1, 1, 0x00, 0, 63, 0])
    only_luma = data[:start] + header + data[start + 2 + int.from_bytes(data[start + 2 : start + 4], "big"):]
    assert not layout.missing_scans() and read_layout(only_luma).missing_scans()


def test_a_cut_without_an_end_marker_is_left_to_the_decoder():
    layout = read_layout(bombs.cut(face_jpeg()))
    assert not layout.complete_marker_stream and not layout.missing_scans()


def test_the_scan_bomb_is_counted_only_up_to_the_limit():
    layout = read_layout(bombs.scan_bomb())
    assert layout.scans == MAX_SCANS + 1 and layout.too_many_scans and layout.too_many_segments


def test_the_app1_bomb_is_counted_only_up_to_the_limit():
    layout = read_layout(bombs.app1_bomb())
    assert layout.app_segments == MAX_APP_SEGMENTS + 1 and layout.too_many_segments


def test_millions_of_empty_segments_stop_the_walk_at_its_limit():
    data = face_jpeg()
    layout = read_layout(data[:2] + b"\xff\xfe\x00\x02" * 2_000_000 + data[2:])
    assert layout.segments == MAX_SEGMENTS + 1 and layout.too_many_segments and layout.scans == 0


def test_progressive_pictures_hold_their_coefficients_and_sequential_ones_do_not():
    progressive = read_layout(encode(portrait((64, 64)), "JPEG", progressive=True))
    assert progressive.coefficient_bytes(64, 64) == (64 + 16 + 16) * 64 * 2  # 4:2:0: Y 8x8 blocks, Cb and Cr 4x4
    full_colour = read_layout(encode(portrait((64, 64)), "JPEG", progressive=True, subsampling=0))
    assert full_colour.coefficient_bytes(64, 64) == 3 * 64 * 64 * 2
    assert read_layout(encode(portrait((64, 64)), "JPEG")).coefficient_bytes(64, 64) == 0


@pytest.mark.parametrize("seed", range(20))
def test_any_bytes_after_a_start_marker_give_a_layout_and_no_exception(seed):
    rng = np.random.default_rng(seed)
    data = bytearray(face_jpeg())
    for position in rng.integers(2, len(data), 8):
        data[position] = int(rng.integers(0, 256))
    layout = read_layout(b"\xff\xd8" + rng.bytes(2000) if seed % 2 else bytes(data))
    assert isinstance(layout, jpeg_markers.JpegLayout)
