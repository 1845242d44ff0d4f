"""Hand-made layouts the backend tests share: random ones and rows with a single tile."""

import torch


def random_layout(n_heads: int, n_blocks: int, density: float, seed: int) -> torch.Tensor:
    """A causal layout with the diagonal set and a random choice of the tiles below it."""
    g = torch.Generator().manual_seed(seed)
    layout = (torch.rand(n_heads, n_blocks, n_blocks, generator=g) < density).tril()
    return layout | torch.eye(n_blocks, dtype=torch.bool)


def single_block_rows(n_heads: int, n_blocks: int) -> torch.Tensor:
    """Head 0 dense but for row 2, which only has its diagonal; every other head only the diagonal."""
    layout = torch.eye(n_blocks, dtype=torch.bool).repeat(n_heads, 1, 1)
    layout[0] = torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
    layout[0, 2, :2] = False
    return layout
