"""Pictures that fit Discord's upload limit: a PNG over it is sent as a high-quality JPEG instead.

Discord refuses a whole message when one file is over the limit of where it goes (10 MiB a file for
a bot in a server without boosts or in DMs, more in boosted servers; the interaction tells the exact
figure as `attachment_size_limit`). An upscaled picture (2048 px for SDXL) can pass it as PNG, but
not as JPEG at quality 95, which looks the same to the eye at a fifth of the size or less.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import discord
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_LIMIT = discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES  # no boosts, or a DM
# Tried in turn: visually lossless first, then smaller, until the picture fits.
JPEG_QUALITIES = (95, 90, 85, 75)


@dataclass(frozen=True)
class Fitted:
    """A picture as it will be sent: its bytes, file name extension, and whether it was converted."""

    data: bytes
    extension: str
    converted: bool = False


def fit_picture(png: bytes, limit: int) -> Fitted | None:
    """`png` as is when it fits `limit` bytes, else as the best JPEG that fits; None when none does."""
    if len(png) <= limit:
        return Fitted(png, "png")
    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=quality, optimize=True)
        if buffer.tell() <= limit:
            log.info("a %d-byte PNG over the %d-byte upload limit goes as a JPEG at quality %d (%d bytes)",
                     len(png), limit, quality, buffer.tell())
            return Fitted(buffer.getvalue(), "jpg", converted=True)
    return None


def converted_note(limit: int) -> str:
    """What a person is told when their picture was sent as JPEG."""
    return (f"The PNG was larger than this channel's upload limit ({limit / 2**20:.0f} MB), "
            "so it was converted to a high-quality JPEG.")


def upload_limit(channel: object, interaction: discord.Interaction | None = None) -> int:
    """Bytes a file may have where it goes: the interaction's own figure while there is one, else the
    channel's server's (its boost tier), else Discord's default for bots."""
    if interaction is not None and getattr(interaction, "filesize_limit", None):
        return int(interaction.filesize_limit)
    guild = getattr(channel, "guild", None)
    return int(guild.filesize_limit) if guild is not None else DEFAULT_UPLOAD_LIMIT


def picture_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG or JPEG, read from its header only."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size
