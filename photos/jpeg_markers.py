"""Reading a JPEG's marker stream without decoding it: how many scans and APP segments, and which
coefficients its scans carry.

libjpeg's cost is not bounded by a file's size: a progressive JPEG may repeat a tiny scan
thousands of times, each one a pass over every block of the picture, and Pillow joins consecutive
EXIF segments in a way that is quadratic in their number. Counting both here, in one linear pass
over the bytes, lets intake refuse such a file before any decoder sees it. The scan headers also
tell whether a file ends before its last scan (a JPEG cut short and closed with an end marker,
which libjpeg decodes with the missing part filled in grey or blurred).

Only the first picture is read: an MPO (a phone JPEG carrying previews or depth maps) is several
JPEGs in a row, and intake uses the first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_SCANS = 100
"""Scans allowed in one picture. libjpeg's standard progression writes 10 (6 for grayscale) and
encoders that tune their scans (mozjpeg) stay under 30; every scan is a pass over all blocks,
about 1-4 ms at 50 megapixels, so 100 bound that part of decoding to well under a second."""

MAX_APP_SEGMENTS = 128
"""APPn segments allowed (EXIF, XMP, ICC profile chunks, MPF, Photoshop...). A phone photo has
2-6; a depth photo with extended XMP or a large ICC profile split in 64 kB chunks has a few dozen."""

MAX_SEGMENTS = 1000
"""Segments of any kind allowed: a legitimate file has the APP segments, a few tables per scan and
the scans; the cap keeps this walk itself short on a file made of millions of empty segments."""

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0-7: no length field
SOS, EOI = 0xDA, 0xD9
_MARKER = re.compile(rb"\xff++[^\xff]")  # a marker, after any 0xFF fill bytes
_MARKER_AFTER_DATA = re.compile(rb"(?<!\xff)\xff++[^\x00\xd0-\xd7\xff]")
"""The next marker after a scan's entropy-coded data. Inside the data a 0xFF is followed by 0x00 (a
stuffed 0xFF byte), a restart marker or more 0xFF fill bytes. Possessive and anchored at the start
of a run of 0xFF, so the search stays linear on any bytes (0.4 s for 20 MB of worst cases)."""
_COEFFICIENTS = 64


@dataclass
class JpegLayout:
    """What the marker stream of a JPEG's first picture says, up to its end marker or the end of the bytes."""

    progressive: bool = False
    components: tuple[int, ...] = ()
    sampling: tuple[tuple[int, int], ...] = ()
    """Each component's horizontal and vertical sampling factors, in the order of `components`."""
    segments: int = 0
    scans: int = 0
    app_segments: int = 0
    complete_marker_stream: bool = False
    """True when the walk reached the end marker (EOI) over well-formed segments."""
    _lowest_bit: dict[int, list[int | None]] = field(default_factory=dict, repr=False)
    """Per component id: for each of the 64 coefficients, the lowest bit position a scan sent (None: never)."""

    @property
    def too_many_scans(self) -> bool:
        return self.scans > MAX_SCANS

    @property
    def too_many_app_segments(self) -> bool:
        return self.app_segments > MAX_APP_SEGMENTS

    @property
    def too_many_segments(self) -> bool:
        return self.too_many_scans or self.too_many_app_segments or self.segments > MAX_SEGMENTS

    def coefficient_bytes(self, width: int, height: int) -> int:
        """Memory libjpeg holds for the DCT coefficients of a `width` x `height` picture.

        A progressive picture, or one whose components come in separate scans, is decoded from a
        buffer of every block's 64 coefficients (2 bytes each) at full size, whatever the output
        size: about 3 bytes a pixel in 4:2:0 colour, 6 in 4:4:4. One interleaved scan needs none.
        """
        if not (self.progressive or self.scans > 1) or not self.sampling:
            return 0
        h_max = max(max(h for h, _ in self.sampling), 1)
        v_max = max(max(v for _, v in self.sampling), 1)
        blocks = sum(-(-width * h // (8 * h_max)) * -(-height * v // (8 * v_max)) for h, v in self.sampling)
        return blocks * 64 * 2

    def missing_scans(self) -> bool:
        """Whether the picture's scans stop before every component got all of its data.

        A sequential JPEG sends each component once, all coefficients at full precision. A
        progressive one sends bands of coefficients and then refines them bit by bit; libjpeg's
        encoders (and mozjpeg's) refuse a scan script that does not end with every coefficient of
        every component at bit 0. Missing scans mean the file was cut short.
        """
        if not self.complete_marker_stream or not self.components:
            return False
        for component in self.components:
            bits = self._lowest_bit.get(component)
            if bits is None:
                return True
            if self.progressive and any(bit != 0 for bit in bits):
                return True
        return False

    def _add_scan(self, components: list[int], ss: int, se: int, al: int) -> None:
        for component in components:
            bits = self._lowest_bit.setdefault(component, [None] * _COEFFICIENTS)
            if not self.progressive:
                bits[:] = [0] * _COEFFICIENTS
                continue
            for k in range(ss, min(se, _COEFFICIENTS - 1) + 1):
                current = bits[k]
                bits[k] = al if current is None else min(current, al)


def read_layout(data: bytes) -> JpegLayout:
    """Walk the segments of the first picture in `data`; stops early once a count is over its limit.

    Never raises: a malformed stream just ends the walk (`complete_marker_stream` stays False) and
    is left for the decoder to refuse.
    """
    layout = JpegLayout()
    size = len(data)
    if not data.startswith(b"\xff\xd8"):
        return layout
    pos = 2
    while pos < size:
        found = _MARKER.match(data, pos)
        if found is None:
            return layout  # bytes where a marker should be, or the end: the decoder decides
        marker, pos = data[found.end() - 1], found.end()
        if marker == EOI:
            layout.complete_marker_stream = True
            return layout
        layout.segments += 1
        if layout.too_many_segments:
            return layout
        if marker in _STANDALONE:
            continue
        if pos + 2 > size:
            return layout
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > size:
            return layout
        body = data[pos + 2 : pos + length]
        pos += length
        if 0xE0 <= marker <= 0xEF:
            layout.app_segments += 1
        elif marker in _SOF_MARKERS and not layout.components:
            layout.progressive = marker in _PROGRESSIVE_SOF
            listed = range(6, min(len(body) - 1, 6 + 3 * (body[5] if len(body) > 5 else 0)), 3)
            layout.components = tuple(body[i] for i in listed)
            layout.sampling = tuple((body[i + 1] >> 4, body[i + 1] & 0x0F) for i in listed)
        elif marker == SOS:
            layout.scans += 1
            _read_scan_header(layout, body)
            following = _MARKER_AFTER_DATA.search(data, pos)
            pos = following.start() if following else size
    return layout


def _read_scan_header(layout: JpegLayout, body: bytes) -> None:
    count = body[0] if body else 0
    if len(body) < 1 + 2 * count + 3:
        return
    components = [body[1 + 2 * i] for i in range(count)]
    ss, se, approximation = body[1 + 2 * count : 4 + 2 * count]
    layout._add_scan(components, ss, se, approximation & 0x0F)
