"""Merging bitmaps across granularities: the byte- and word-wise coarsening
gives the bits of the bit-by-bit rule QEMU's hbitmap merge follows (a fine
granule dirty makes its coarse granule dirty; a coarse one dirties every
fine granule under it)."""

from __future__ import annotations

import numpy as np
import pytest

from qimg.formats.qcow2.bitmap_ops import _regranulate


def _bit_by_bit(bits: np.ndarray, from_gb: int, to_gb: int) -> np.ndarray:
    flags = np.unpackbits(bits, bitorder="little")
    if from_gb > to_gb:
        flags = np.repeat(flags, 1 << (from_gb - to_gb))
    elif from_gb < to_gb:
        flags = flags.reshape(-1, 1 << (to_gb - from_gb)).any(axis=1)
    return np.packbits(flags, bitorder="little")


@pytest.mark.parametrize("density", [0.0005, 0.05, 0.95])
@pytest.mark.parametrize("from_gb", range(9, 22, 2))
def test_regranulated_bits_equal_the_bit_by_bit_rule(from_gb, density):
    rng = np.random.default_rng(from_gb)
    bits = np.packbits(rng.random(8 * 8192) < density, bitorder="little")
    for to_gb in range(9, 22):
        assert np.array_equal(
            _regranulate(bits, from_gb, to_gb), _bit_by_bit(bits, from_gb, to_gb)
        ), (from_gb, to_gb)
