"""`python -m tests.photos.big_parent`: a parent of about 900 MB starts an intake pool and prints the
peak memory its child reports for one selfie (Linux counts a parent's size in its spawned child's
ru_maxrss, and that is not the photo's cost)."""

from __future__ import annotations

import asyncio
import sys

from photos.intake import IntakeLimits
from photos.sandbox import IntakePool
from tests.photos_factory import face_jpeg


async def one_selfie() -> int | None:
    pool = IntakePool(1)
    try:
        return (await pool.normalise(face_jpeg(), IntakeLimits())).peak_rss_bytes
    finally:
        await pool.close()


if __name__ == "__main__":
    ballast = bytearray(900 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):  # touched, so it is resident
        ballast[i] = 1
    sys.stdout.write(f"{asyncio.run(one_selfie())}\n")
