from __future__ import annotations

import pytest
import torch

from services.must.masking import cell_size_for, random_cell_mask, token_mask_to_pixels


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("grid", "cell", "ratio"), [((8, 8), 2, 0.5), ((6, 4), 2, 0.3), ((4, 4), 1, 0.75)])
def test_exact_masked_count(grid: tuple[int, int], cell: int, ratio: float) -> None:
    mask = random_cell_mask(3, grid, cell, ratio, generator=_seeded(0))
    num_cells = (grid[0] // cell) * (grid[1] // cell)
    assert mask.dtype == torch.bool
    assert mask.shape == (3, grid[0] * grid[1])
    assert mask.sum(dim=1).tolist() == [round(ratio * num_cells) * cell * cell] * 3


def test_masked_tokens_form_whole_cells() -> None:
    cell = 2
    mask = random_cell_mask(4, (8, 6), cell, 0.5, generator=_seeded(1)).view(4, 8, 6)
    blocks = mask.view(4, 4, cell, 3, cell).permute(0, 1, 3, 2, 4).reshape(4, 4, 3, cell * cell)
    # Every cell x cell block is either fully masked or fully visible.
    assert torch.all(blocks.all(dim=-1) | ~blocks.any(dim=-1))


def test_reproducible_and_seed_dependent() -> None:
    first = random_cell_mask(2, (8, 8), 2, 0.5, generator=_seeded(7))
    again = random_cell_mask(2, (8, 8), 2, 0.5, generator=_seeded(7))
    other = random_cell_mask(2, (8, 8), 2, 0.5, generator=_seeded(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_zero_ratio_masks_nothing() -> None:
    assert not random_cell_mask(2, (4, 4), 2, 0.0).any()


@pytest.mark.parametrize(("grid", "cell"), [((7, 8), 2), ((8, 9), 3), ((4, 4), 0)])
def test_bad_grid_raises(grid: tuple[int, int], cell: int) -> None:
    with pytest.raises(ValueError, match="cell"):
        random_cell_mask(1, grid, cell, 0.5)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        random_cell_mask(1, (4, 4), 2, ratio)


def test_token_mask_to_pixels() -> None:
    tokens = torch.tensor([[True, False, False, True, False, False]])
    pixels = token_mask_to_pixels(tokens, (2, 3), patch=2)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    assert pixels.shape == (1, 1, 4, 6)
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels[0, 0], expected)


@pytest.mark.parametrize(
    ("patch_size", "image_size", "expected"),
    [(16, 224, 2), (32, 224, 1), (14, 224, 2), (4, 32, 1), (16, 448, 4), (16, 384, 3), (16, 320, 2)],
)
def test_cell_size_for(patch_size: int, image_size: int, expected: int) -> None:
    assert cell_size_for(patch_size, image_size) == expected
