"""Text URL lists split in byte ranges: every line is read exactly once, whatever the split
(the builds of issue 17 themselves: tests/integration/test_build_changes.py)."""
import io
import random

from dataprep.inputs.sources import _text_lines


def test_text_lists_split_in_byte_ranges_read_each_line_once():
    rng = random.Random(5)
    for _ in range(300):
        data = b"".join(b"x" * rng.randint(0, 20) + b"\n" for _ in range(rng.randint(0, 30)))
        data += b"tail" * rng.randint(0, 1)
        n = rng.randint(1, 8)
        got = [line for k in range(n)
               for line in _text_lines(io.BytesIO(data), len(data) * k // n, len(data) * (k + 1) // n)]
        offsets = [0]
        for line in data.splitlines(keepends=True)[:-1]:
            offsets.append(offsets[-1] + len(line))
        assert got == list(zip(offsets, data.splitlines(keepends=True)))
