"""Launch grids within CUDA's limits for any input size (pure Python: no triton, no tensors).

CUDA caps a grid at 2**31 - 1 programs on axis x and 65,535 on axes y and z, and Triton does not
check: a grid past a cap fails to launch. The kernels put their long axis (corpus rows, sequences)
on x and cut whatever still does not fit into several launches, each told the block offset of its
first program, so no launch exceeds a cap however many rows there are.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65_535
# What the launchers obey; a test lowers it to run the multi-launch path on a small shape.
GRID_CAPS = (MAX_GRID_X, MAX_GRID_Y)


class Launch(NamedTuple):
    """One kernel launch: `grid` programs whose block indices start at (offset_x, offset_y)."""

    offset_x: int
    offset_y: int
    grid: tuple[int, int]


def tiled_grid(blocks_x: int, blocks_y: int, caps: tuple[int, int] | None = None) -> list[Launch]:
    """Launches covering blocks_x x blocks_y program blocks exactly once, each within caps
    (default GRID_CAPS). The usual case is one launch of (blocks_x, blocks_y); more only past a cap."""
    max_x, max_y = GRID_CAPS if caps is None else caps
    if min(blocks_x, blocks_y) < 0 or min(max_x, max_y) < 1:
        raise ValueError(f"tiled_grid needs blocks >= 0 and caps >= 1, got {blocks_x} x {blocks_y} within {max_x} x {max_y}")
    return [
        Launch(offset_x, offset_y, (min(max_x, blocks_x - offset_x), min(max_y, blocks_y - offset_y)))
        for offset_y in range(0, blocks_y, max_y)
        for offset_x in range(0, blocks_x, max_x)
    ]
