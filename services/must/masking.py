"""Block-wise random patch masking for MUST's masked image modelling branch."""

from __future__ import annotations

import torch
from torch import Tensor


def _cell_grid(grid: tuple[int, int], cell: int) -> tuple[int, int]:
    """Number of mask cells per side, validating that the token grid tiles exactly."""
    gh, gw = grid
    if cell < 1:
        raise ValueError(f"cell must be >= 1 patch, got {cell}")
    if gh % cell or gw % cell:
        raise ValueError(f"token grid {gh}x{gw} is not divisible into {cell}x{cell}-patch mask cells")
    return gh // cell, gw // cell


def random_cell_mask(
    batch: int,
    grid: tuple[int, int],
    cell: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Mask round(ratio * cells) random cell x cell blocks per image; bool [batch, gh*gw], True = masked."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    ch, cw = _cell_grid(grid, cell)
    num_cells = ch * cw
    num_masked = round(ratio * num_cells)
    # Draw on the generator's own device (a CPU generator cannot feed CUDA rand), then move.
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_cells, generator=generator, device=noise_device)
    chosen = noise.argsort(dim=1)[:, :num_masked].to(device)
    cell_mask = torch.zeros(batch, num_cells, dtype=torch.bool, device=chosen.device)
    cell_mask.scatter_(1, chosen, True)
    cell_mask = cell_mask.view(batch, ch, cw)
    token_mask = cell_mask.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
    return token_mask.reshape(batch, grid[0] * grid[1])


def token_mask_to_pixels(token_mask: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """Expand a bool [B, gh*gw] token mask to a float [B, 1, gh*patch, gw*patch] pixel mask."""
    gh, gw = grid
    if token_mask.shape[-1] != gh * gw:
        raise ValueError(f"token mask has {token_mask.shape[-1]} tokens, grid {gh}x{gw} needs {gh * gw}")
    per_patch = token_mask.reshape(-1, gh, gw).float()
    pixels = per_patch.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return pixels.unsqueeze(1)


def cell_size_for(patch_size: int, image_size: int) -> int:
    """Patches per mask cell side, so a cell spans about 32 px at 224 px input, scaled with image size.

    Rule: cell_px = max(patch_size, round(32 * image_size / 224 / patch_size) * patch_size);
    cells = cell_px // patch_size, then lowered to the largest value (>= 1) that divides the
    token grid side image_size // patch_size.
    """
    cell_px = max(patch_size, round(32 * image_size / 224 / patch_size) * patch_size)
    cells = cell_px // patch_size
    grid_side = image_size // patch_size
    while cells > 1 and grid_side % cells:
        cells -= 1
    return max(cells, 1)
