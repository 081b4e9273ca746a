"""One image with a numbered thumbnail of each kept photo, for `/photos`."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

THUMB = 128
COLUMNS = 6


def contact_sheet(pngs: Sequence[bytes], thumb: int = THUMB, columns: int = COLUMNS) -> bytes:
    """Thumbnails in rows of `columns`, each labelled with its number (1-based), as PNG bytes."""
    if not pngs:
        raise ValueError("no photos to show")
    columns = min(columns, len(pngs))
    rows = math.ceil(len(pngs) / columns)
    sheet = Image.new("RGB", (columns * thumb, rows * thumb), "white")
    draw = ImageDraw.Draw(sheet)
    for number, data in enumerate(pngs, start=1):
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            rgb.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
            x, y = (number - 1) % columns * thumb, (number - 1) // columns * thumb
            sheet.paste(rgb, (x, y))
        label = str(number)
        draw.rectangle((x, y, x + 10 + 8 * len(label), y + 16), fill="black")
        draw.text((x + 5, y + 2), label, fill="white")
    out = io.BytesIO()
    sheet.save(out, "PNG", optimize=False, compress_level=3)
    return out.getvalue()
