"""How a `sslfast::similarity_lse` problem is posed: `IndexMaps` (which global rows and columns a rank's local
ones are, and each row's positive) and `LseSpec` (the maps plus the problem's flags), with the specs the
contrastive losses use, cached. The custom ops take a spec's fields flattened (`*spec`) and `_spec` rebuilds it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

NO_SPLIT = 1 << 30  # "never": an index map with no second segment, or an identity pairing
BOUNDED_SCALE = 64.0  # plain-sum statistics hold for |logits| <= 64 (sslfast.kernels.infonce)


class IndexMaps(NamedTuple):
    """Global indices of local rows and columns, and each row's positive column.

    Local row i is global row i + row_off + [i >= row_split]·row_shift (columns likewise with col_*), so a
    rank's rows can be scored against an all-gathered batch; the positive of global row g is global column
    π(g) = (g + pos_shift) mod pos_period. The defaults: identity maps, π(g) = g (CLIP, MoCo v3)."""

    row_off: int = 0
    row_split: int = NO_SPLIT
    row_shift: int = 0
    col_off: int = 0
    col_split: int = NO_SPLIT
    col_shift: int = 0
    pos_shift: int = 0
    pos_period: int = NO_SPLIT

    @functools.lru_cache(maxsize=256)  # noqa: B019  (a handful of maps, immutable; a hit costs no Python call)
    def swapped(self) -> IndexMaps:
        """The maps of Sᵀ (columns as rows); the pairing is kept, which is Sᵀ's when π is an involution."""
        return IndexMaps(
            self.col_off,
            self.col_split,
            self.col_shift,
            self.row_off,
            self.row_split,
            self.row_shift,
            self.pos_shift,
            self.pos_period,
        )


class LseSpec(NamedTuple):
    """One `similarity_lse` problem: `maps`; `symmetric`, b is a (NT-Xent on one device); `exclude_self`,
    j = i leaves row i's negatives; `want_pos`, the positives are columns of b (left out of the sums);
    `col_stats`, column log-sum-exps too (CLIP); `bounded`, |scale| <= 64 is known (plain-sum kernels)."""

    maps: IndexMaps
    symmetric: bool = False
    exclude_self: bool = False
    want_pos: bool = True
    col_stats: bool = False
    bounded: bool = False


_IDENTITY = IndexMaps()


@functools.lru_cache(maxsize=256)
def _spec(maps: tuple, symmetric, exclude_self, want_pos, col_stats, bounded) -> LseSpec:
    """The `LseSpec` of a custom op's flat arguments, `maps` as a tuple (it arrives as a list when traced);
    cached, as are the specs the losses pose (a hit costs no Python call)."""
    return LseSpec(IndexMaps(*maps), symmetric, exclude_self, want_pos, col_stats, bounded)


@functools.lru_cache(maxsize=256)
def _pair_spec(n: int, bounded: bool) -> LseSpec:
    """Single-device NT-Xent: [z1; z2] (2n rows) against itself, row i's positive i ± n, itself excluded."""
    return LseSpec(IndexMaps(pos_shift=n, pos_period=2 * n), symmetric=True, exclude_self=True, bounded=bounded)


@functools.lru_cache(maxsize=256)
def _rows_spec(row_off: int, bounded: bool) -> LseSpec:
    """Rows (global offset `row_off`) against all columns, row i's positive column i (MoCo v3, CLIP gathered)."""
    return LseSpec(IndexMaps(row_off=row_off), bounded=bounded)


_QUEUE_SPECS = {bounded: LseSpec(_IDENTITY, want_pos=False, bounded=bounded) for bounded in (False, True)}
_CLIP_SPEC = LseSpec(_IDENTITY, col_stats=True)
