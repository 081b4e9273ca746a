"""Photo intake on a generated corpus of good and broken uploads (see tests/photos/intake_corpus.py)."""

from __future__ import annotations

import io
import pickle
import typing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageFilter

from photos import faces, imagehash
from photos.intake import (
    WARNINGS,
    IntakeCode,
    IntakeError,
    IntakeLimits,
    NormalisedPhoto,
    check_duplicates,
    hamming,
    normalise_photo,
    sniff_format,
    to_srgb,
)
from tests.photos import intake_corpus as corpus
from tests.photos_factory import encode, face_image, face_jpeg, portrait


def decoded(photo: NormalisedPhoto) -> Image.Image:
    img = Image.open(io.BytesIO(photo.png))
    assert img.format == "PNG"
    img.load()
    return img


def pixels(photo: NormalisedPhoto) -> np.ndarray:
    return np.asarray(decoded(photo), dtype=np.int32)


def by_name(name: str) -> corpus.Case:
    return next(case for case in corpus.CASES if case.name == name)


def normalised(name: str) -> NormalisedPhoto:
    case = by_name(name)
    return normalise_photo(case.make(), case.limits)


# --- the corpus, case by case --------------------------------------------------------------------


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda case: case.name)
def test_corpus_case_has_its_exact_outcome(case: corpus.Case) -> None:
    data = case.make()
    if isinstance(case.expect, str):
        with pytest.raises(IntakeError) as caught:
            normalise_photo(data, case.limits)
        assert caught.value.code == case.expect
        assert caught.value.message == str(caught.value)
        assert "Error" not in caught.value.message and "Traceback" not in caught.value.message
        return
    photo = normalise_photo(data, case.limits)
    assert photo.flags == case.expect
    assert photo.warnings == tuple(WARNINGS[flag] for flag in case.expect)
    img = decoded(photo)
    assert (img.mode, img.size) == ("RGB", (512, 512))
    if case.source_format:
        assert photo.source_format == case.source_format
    assert ("no_face" in photo.flags) == (photo.face_box is None)


def test_corpus_exercises_every_refusal_code() -> None:
    refused = {case.expect for case in corpus.CASES if isinstance(case.expect, str)}
    # the two duplicate codes need a collection; they are tested below
    assert refused | {"duplicate", "near_duplicate"} == set(typing.get_args(IntakeCode))
    assert len(corpus.CASES) >= 25


# --- orientation ---------------------------------------------------------------------------------

RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)


def quadrant_colours(photo: NormalisedPhoto) -> list[tuple[int, int, int]]:
    """Mean colour around the centre of each output quadrant: top-left, top-right, bottom-left, bottom-right."""
    px = pixels(photo)
    centres = [(128, 128), (128, 384), (384, 128), (384, 384)]  # (row, column)
    return [tuple(px[r - 40 : r + 40, c - 40 : c + 40].reshape(-1, 3).mean(axis=0).round()) for r, c in centres]


def assert_colours(found: list[tuple[int, ...]], expected: list[tuple[int, int, int]]) -> None:
    for got, want in zip(found, expected, strict=True):
        assert np.abs(np.array(got) - np.array(want)).max() < 25, (found, expected)


def test_exif_orientation_6_turns_the_photo_clockwise() -> None:
    photo = normalised("exif_orientation_6")
    assert (photo.width, photo.height) == (480, 640)
    # stored: red green / blue yellow; shown turned 90 degrees clockwise: blue red / yellow green
    assert_colours(quadrant_colours(photo), [BLUE, RED, YELLOW, GREEN])


def test_exif_orientation_3_turns_the_photo_upside_down() -> None:
    photo = normalised("exif_orientation_3")
    assert (photo.width, photo.height) == (640, 480)
    assert_colours(quadrant_colours(photo), [YELLOW, BLUE, GREEN, RED])


def test_too_small_reports_the_upright_size() -> None:
    data = corpus.jpeg_with_orientation(corpus.noise_image((300, 120)), 6)
    with pytest.raises(IntakeError) as caught:
        normalise_photo(data)
    assert caught.value.code == "too_small"
    assert "120×300 pixels" in caught.value.message
    assert "256" in caught.value.message


# --- colour --------------------------------------------------------------------------------------


def mean_colour(photo: NormalisedPhoto, columns: slice = slice(None)) -> np.ndarray:
    return pixels(photo)[:, columns].reshape(-1, 3).mean(axis=0)


def test_cmyk_jpeg_becomes_the_matching_rgb() -> None:
    r, g, b = mean_colour(normalised("cmyk_jpeg"))
    # mostly cyan ink, a little magenta and yellow, no black
    assert r < 80 and g > 200 and b > 205


def test_palette_transparency_becomes_white() -> None:
    photo = normalised("palette_png_transparent")
    px = pixels(photo)
    assert px[:, :240].min() >= 250, "the transparent half must be white"
    assert px[:, 272:].mean() < 200, "the opaque half keeps its colours"


@pytest.mark.parametrize(("name", "colour"), [("la_png", (90, 90, 90)), ("rgba_png", (20, 90, 200))])
def test_alpha_is_composited_on_white(name: str, colour: tuple[int, int, int]) -> None:
    photo = normalised(name)
    assert pixels(photo)[:, :240].min() >= 250
    assert np.abs(mean_colour(photo, slice(272, None)) - colour).max() < 6


def test_gray16_png_is_scaled_not_clipped() -> None:
    photo = normalised("gray16_png")
    px = pixels(photo)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    _, samples = corpus.gray16_gradient()
    expected = samples.astype(np.float64) / 257  # the 512x512 source is kept pixel for pixel
    columns = px[..., 0].mean(axis=0)
    assert np.abs(columns - expected.mean(axis=0)).max() < 3
    assert columns[:32].mean() < 20 and 110 < columns[240:272].mean() < 146 and columns[-32:].mean() > 235


def test_rgb16_png_keeps_its_colour() -> None:
    assert np.abs(mean_colour(normalised("rgb16_png")) - np.array([60000, 30000, 5000]) / 257).max() < 4


def test_grayscale_becomes_neutral_rgb() -> None:
    px = pixels(normalised("grayscale_l_jpeg"))
    assert (px[..., 0] == px[..., 2]).all()
    assert abs(px.mean() - 128) < 4


def test_embedded_icc_profile_is_converted_to_srgb() -> None:
    red = corpus.textured("RGB", (230, 20, 20))
    tagged = normalise_photo(encode(red, "PNG", icc_profile=corpus.rgb_swapping_icc()))
    untagged = normalise_photo(encode(red, "PNG"))
    r, g, _ = mean_colour(tagged)
    assert g > 170 and r < 90, "stored red means green under the embedded profile"
    r, g, _ = mean_colour(untagged)
    assert r > 200 and g < 40, "without a profile the pixels are already sRGB"


@pytest.mark.parametrize(
    ("mode", "samples", "expected"),
    [
        ("I;16B", np.array([[0, 257, 32896, 65535]], dtype=">u2"), [0, 1, 128, 255]),
        ("I", np.array([[0, 1000, 32896, 65535]], dtype=np.int32), [0, 4, 128, 255]),
        ("F", np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), [0, 64, 128, 255]),
    ],
)
def test_wide_sample_modes_are_scaled_to_8_bit(mode: str, samples: np.ndarray, expected: list[int]) -> None:
    if mode == "I;16B":
        img = Image.frombytes(mode, (4, 1), samples.tobytes())
    else:
        img = Image.fromarray(samples, mode=mode)
    assert img.mode == mode
    rgb = to_srgb(img)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == expected


# --- faces and framing ---------------------------------------------------------------------------


def face_centre_in_output(photo: NormalisedPhoto) -> tuple[float, float]:
    found = faces.detect_faces(decoded(photo), (512, 512))
    assert len(found) == 1, found
    x, y, w, h = found[0]
    return x + w / 2, y + h / 2


def test_one_face_is_found_where_it_was_drawn() -> None:
    photo = normalised("face_jpeg")
    x, y, w, h = photo.face_box
    assert abs(x + w / 2 - 400) < 25 and abs(y + h / 2 - 450) < 25  # drawn at (0.5, 0.45) of 800x1000
    assert 300 < w < 500


def test_face_near_a_corner_is_brought_to_the_middle() -> None:
    photo = normalised("face_in_corner")
    x, y, w, h = photo.face_box
    # a centre crop of this 1600x900 photo spans x 350..1250 and would cut the face out entirely
    assert x + w < 350
    cx, cy = face_centre_in_output(photo)
    assert abs(cx - 256) < 60 and abs(cy - 256) < 60


def test_small_face_is_flagged_and_still_framed() -> None:
    photo = normalised("small_face")
    assert photo.flags == ("small_face",)
    _, _, w, h = photo.face_box
    assert w * h < 0.02 * photo.width * photo.height
    cx, cy = face_centre_in_output(photo)
    assert abs(cx - 256) < 40 and abs(cy - 256 - 512 * faces.HEADROOM / faces.CROP_FACTOR) < 40


def test_several_faces_are_flagged_and_centre_cropped() -> None:
    photo = normalised("two_faces")
    assert photo.flags == ("several_faces",)
    found = faces.detect_faces(decoded(photo), (512, 512))
    assert len(found) == 2  # a centre crop of the 1200x800 group keeps both people


def test_large_jpeg_is_decoded_reduced_but_measured_in_full_size() -> None:
    drawn = portrait((4000, 3000), ((0.45, 0.4, 0.12),))
    photo = normalise_photo(encode(drawn, "JPEG", quality=90))
    assert (photo.width, photo.height) == (4000, 3000)
    assert photo.flags == ()
    x, y, w, h = photo.face_box  # in the photo's own pixels, not the half-size decode's
    assert abs(x + w / 2 - 1800) < 60 and abs(y + h / 2 - 1200) < 60
    assert 480 < w < 720  # drawn 480 wide, 624 tall
    cx, cy = face_centre_in_output(photo)
    assert abs(cx - 256) < 40 and abs(cy - 256) < 60


def test_far_smaller_faces_do_not_count_as_other_people(monkeypatch: pytest.MonkeyPatch) -> None:
    img = portrait((1200, 900), ((0.35, 0.45, 0.3), (0.85, 0.3, 0.08)))
    monkeypatch.setattr(faces, "RELATIVE_MIN_FACE", 0.0)
    assert len(faces.detect_faces(img, img.size)) == 2, "the cascade sees the stranger"
    monkeypatch.undo()
    found = faces.detect_faces(img, img.size)
    assert len(found) == 1 and found[0][0] < 600, "only the main face is kept"


def test_detector_is_quiet_on_photos_without_faces() -> None:
    for img in (corpus.landscape(seed=s) for s in range(3)):
        assert faces.detect_faces(img, img.size) == []


def test_crop_slides_inside_the_image_instead_of_shrinking() -> None:
    left, top, side, _ = faces.crop_around_face((0, 0, 100, 100), (1000, 800))
    assert (left, top, side) == (0, 0, 250)
    left, top, side, _ = faces.crop_around_face((900, 700, 100, 100), (1000, 800))
    assert (left, top, side) == (750, 550, 250)
    assert faces.crop_around_face((300, 300, 400, 400), (1000, 800))[2] == 800


# --- blur ----------------------------------------------------------------------------------------


def test_sharpness_falls_as_blur_grows() -> None:
    gray = np.asarray(corpus.landscape().convert("L"))
    measures = [
        imagehash.sharpness(np.asarray(Image.fromarray(gray).filter(ImageFilter.GaussianBlur(r)))) if r else
        imagehash.sharpness(gray)
        for r in (0, 1, 2, 4)
    ]
    assert measures == sorted(measures, reverse=True)


# --- duplicates ----------------------------------------------------------------------------------


def stored(*photos: NormalisedPhoto) -> list[tuple[str, int]]:
    return [(p.sha256, p.phash) for p in photos]


def refusal(photo: NormalisedPhoto, existing: list[tuple[str, int]]) -> IntakeError:
    with pytest.raises(IntakeError) as caught:
        check_duplicates(photo, existing)
    return caught.value


def test_same_upload_twice_is_an_exact_duplicate() -> None:
    first = normalise_photo(face_jpeg())
    again = normalise_photo(face_jpeg())
    assert again == first  # intake is deterministic
    error = refusal(again, stored(first))
    assert error.code == "duplicate"
    assert "already" in error.message


def test_same_pixels_in_another_format_are_an_exact_duplicate() -> None:
    img = face_image()
    as_png = normalise_photo(encode(img, "PNG"))
    as_webp = normalise_photo(encode(img, "WEBP", lossless=True))
    assert as_png.sha256 == as_webp.sha256
    assert refusal(as_webp, stored(as_png)).code == "duplicate"


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(lambda img: encode(img, "JPEG", quality=60), id="jpeg_quality_60"),
        pytest.param(lambda img: encode(img.resize((720, 900), Image.Resampling.LANCZOS), "PNG"),
                     id="resized_90_percent"),
    ],
)
def test_re_encoded_or_resized_photo_is_a_near_duplicate(variant: typing.Callable[[Image.Image], bytes]) -> None:
    original = normalise_photo(face_jpeg())
    copy = normalise_photo(variant(face_image()))
    assert copy.sha256 != original.sha256
    assert hamming(copy.phash, original.phash) <= IntakeLimits().near_duplicate_distance
    assert refusal(copy, stored(original)).code == "near_duplicate"


def test_other_photos_of_the_same_face_are_not_duplicates() -> None:
    kept = [
        normalise_photo(encode(img, "JPEG", quality=90))
        for img in (
            portrait(),
            portrait((1000, 1000), ((0.45, 0.5, 0.35),)),
            portrait((800, 1000), ((0.5, 0.5, 0.6),), light=-0.35),
            portrait((1600, 1000), ((0.3, 0.5, 0.15),), background=(90, 120, 80), seed=3),
        )
    ]
    for i, photo in enumerate(kept):
        check_duplicates(photo, stored(*kept[:i]))


def test_exact_duplicate_wins_over_a_near_one_in_any_order() -> None:
    photo = normalise_photo(face_jpeg())
    near = normalise_photo(encode(face_image(), "JPEG", quality=60))
    assert refusal(photo, stored(near, photo)).code == "duplicate"
    assert refusal(photo, iter(stored(photo, near))).code == "duplicate"


def test_near_duplicate_threshold_comes_from_the_limits() -> None:
    photo = normalise_photo(face_jpeg())
    flipped = photo.phash ^ 0b111  # three bits away
    check_duplicates(photo, [("other", flipped)], IntakeLimits(near_duplicate_distance=2))
    with pytest.raises(IntakeError):
        check_duplicates(photo, [("other", flipped)], IntakeLimits(near_duplicate_distance=3))


def test_hamming_counts_differing_bits() -> None:
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(2**64 - 1, 0) == 64
    assert hamming(12345, 12345) == 0


def test_perceptual_hash_is_64_bits() -> None:
    assert 0 <= normalise_photo(face_jpeg()).phash < 2**64


# --- recognising formats -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "expected"),
    [
        ("JPEG", {}, "JPEG"),
        ("PNG", {}, "PNG"),
        ("WEBP", {}, "WEBP"),
        ("HEIF", {}, "HEIF"),
        ("GIF", {}, "GIF"),
        ("BMP", {}, "BMP"),
        ("TIFF", {}, "TIFF"),
        ("AVIF", {}, "AVIF"),
        ("ICO", {}, "ICO"),
        ("JPEG2000", {}, "JPEG2000"),
    ],
)
def test_formats_are_recognised_from_their_bytes(fmt: str, params: dict, expected: str) -> None:
    assert sniff_format(encode(corpus.noise_image((64, 64)), fmt, **params)) == expected


def test_unsupported_format_message_names_it_and_what_is_accepted() -> None:
    with pytest.raises(IntakeError) as caught:
        normalise_photo(encode(face_image(), "BMP"))
    assert caught.value.message.startswith("BMP files aren't supported")
    assert "JPEG, PNG, WebP or HEIC" in caught.value.message


def test_limit_messages_state_the_numbers() -> None:
    with pytest.raises(IntakeError) as caught:
        normalise_photo(b"\xff\xd8\xff" + bytes(300_000), IntakeLimits(max_bytes=200_000))
    assert caught.value.code == "too_large"
    assert "0.3 MB" in caught.value.message and "0.2 MB" in caught.value.message
    with pytest.raises(IntakeError) as caught:
        normalise_photo(corpus.decompression_bomb_png())
    assert "8000×8000" in caught.value.message and "50 megapixels" in caught.value.message


def test_kept_png_carries_no_metadata_from_the_upload() -> None:
    exif = Image.Exif()
    exif[0x010E] = "at home, 12 Example Street"  # ImageDescription
    upload = encode(corpus.textured("RGB", (230, 20, 20)), "PNG", icc_profile=corpus.rgb_swapping_icc(),
                           exif=exif)
    kept = decoded(normalise_photo(upload))
    assert "icc_profile" not in kept.info and "exif" not in kept.info
    assert b"Example Street" not in normalise_photo(upload).png


def test_worker_threads_get_the_same_results_as_one_thread() -> None:
    uploads = [by_name(name).make() for name in ("face_jpeg", "face_heic", "two_faces", "cmyk_jpeg", "icc_tagged_png")]
    alone = [normalise_photo(data) for data in uploads]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(normalise_photo, uploads * 2))
    assert together == alone * 2


def test_intake_error_survives_pickling_to_another_process() -> None:
    error = pickle.loads(pickle.dumps(IntakeError("too_small", "That photo is only 100×100 pixels.")))
    assert (error.code, error.message, str(error)) == ("too_small", "That photo is only 100×100 pixels.", error.message)


def test_truncated_files_do_not_switch_on_truncated_loading() -> None:
    with pytest.raises(IntakeError):
        normalise_photo(by_name("truncated_jpeg").make())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
