"""Pictures fitted to Discord's upload limit: a PNG that fits goes as it is, one over it as a JPEG."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
from PIL import Image

from bot.upload_fit import DEFAULT_UPLOAD_LIMIT, converted_note, fit_picture, picture_size, upload_limit


def noisy_png(side: int = 96) -> bytes:
    """A PNG that compresses badly, as pictures with fine detail do."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_png_within_the_limit_is_sent_as_it_is() -> None:
    png = noisy_png()
    fitted = fit_picture(png, len(png))
    assert fitted is not None and (fitted.data, fitted.extension, fitted.converted) == (png, "png", False)


def test_a_png_over_the_limit_becomes_a_jpeg_of_the_same_size_within_it() -> None:
    png = noisy_png()
    fitted = fit_picture(png, len(png) // 2)
    assert fitted is not None and fitted.converted and fitted.extension == "jpg"
    assert fitted.data.startswith(b"\xff\xd8") and len(fitted.data) <= len(png) // 2
    assert picture_size(fitted.data) == picture_size(png) == (96, 96)
    assert fit_picture(png, 100) is None  # not even the smallest JPEG fits
    assert "converted to a high-quality JPEG" in converted_note(25 * 2**20) and "(25 MB)" in converted_note(25 * 2**20)


def test_the_limit_is_the_interactions_else_the_servers_else_discords_default() -> None:
    boosted = SimpleNamespace(guild=SimpleNamespace(filesize_limit=50 * 2**20))
    assert upload_limit(boosted, SimpleNamespace(filesize_limit=8 * 2**20)) == 8 * 2**20
    assert upload_limit(boosted) == 50 * 2**20
    assert upload_limit(SimpleNamespace()) == upload_limit(None) == DEFAULT_UPLOAD_LIMIT == 10 * 2**20
