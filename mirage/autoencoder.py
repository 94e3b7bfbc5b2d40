"""Latents <-> pixels for either autoencoder: PRX's scale and shift, the pixel range, tiling.

Both VAEs (`mirage.vae_flux.FluxVAE`, `mirage.vae_dcae.DCAE`) expose `encode(images in [-1, 1]) -> raw
latents`, `decode(raw latents) -> images in about [-1, 1]`, `spatial_compression` (f),
`latent_channels`, `fp16_safe`, and a config with `scaling_factor` and `shift_factor` (0 for DC-AE).
The transformer works on scaled latents, (raw - shift_factor) * scaling_factor; the conversions here
follow PRXPipeline's post-processing exactly (and its inverse for encoding).

Large images are processed in overlapping tiles whose outputs are blended with linear ramps, so a
2048x2048 decode needs about the memory of a 1024x1024 one (Flux VAE, fp32, CPU: peak RSS ~3.7 GB in
1024 px tiles against ~13 GB or more in one pass). The result is not identical to a whole-
image pass: normalisation statistics and attention see one tile at a time (diffusers' tiling has the
same property). Tiling switches on by itself when the latent grid holds more cells than a
`tile_pixels`-square image (1024x1024 px by default); `tiled=True/False` forces either way.

Shapes: B batch, C latent channels, H/W image height/width, h/w latent grid (H/f, W/f).
"""

import math
from typing import Callable

import torch
from torch import nn

# Tile side in pixels (a tile is tile_pixels / f latent cells square), and the automatic threshold:
# images above this area are tiled. Neighbouring tiles share at least a quarter of a tile's side.
TILE_PIXELS = 1024
TILE_OVERLAP = 0.25


def decode_latents(
    vae: nn.Module, latents: torch.Tensor, tiled: bool | None = None, tile_pixels: int = TILE_PIXELS
) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> decoded images [B, 3, f*h, f*w] in about [-1, 1], in the VAE's dtype.

    This is what PRXPipeline resizes when it bins resolutions, before `to_unit_range`.
    """
    # PRXPipeline's undoing of the training-time normalisation, in the latents' own dtype as there.
    raw = latents / vae.config.scaling_factor + vae.config.shift_factor  # [B, C, h, w]
    raw = raw.to(_param_dtype(vae))
    f = vae.spatial_compression
    decode = _one_image_at_a_time(vae.decode)
    if _use_tiles(tiled, raw.shape[-2:], f, tile_pixels):
        return _blend_tiles(decode, raw, 1, f, *_tile_cells(f, tile_pixels))  # [B, 3, f*h, f*w]
    return decode(raw)  # [B, 3, f*h, f*w]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in about [-1, 1] -> [0, 1], clamped (diffusers' image_processor denormalisation)."""
    return (images / 2 + 0.5).clamp(0, 1)


def latents_to_images(
    vae: nn.Module, latents: torch.Tensor, tiled: bool | None = None, tile_pixels: int = TILE_PIXELS
) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> images [B, 3, f*h, f*w] in [0, 1], in the VAE's dtype."""
    return to_unit_range(decode_latents(vae, latents, tiled, tile_pixels))


def images_to_latents(
    vae: nn.Module, images: torch.Tensor, tiled: bool | None = None, tile_pixels: int = TILE_PIXELS
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> scaled latents [B, C, H/f, W/f] as the transformer sees them.

    H and W must be multiples of f. The latent is the encoder's mean (see the VAE's `encode`).
    """
    f = vae.spatial_compression
    if images.shape[-2] % f or images.shape[-1] % f:
        raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of the VAE's compression {f}")
    pixels = (images * 2 - 1).to(_param_dtype(vae))  # [-1, 1], the range the encoder was trained on
    grid = (images.shape[-2] // f, images.shape[-1] // f)
    encode = _one_image_at_a_time(vae.encode)
    if _use_tiles(tiled, grid, f, tile_pixels):
        raw = _blend_tiles(encode, pixels, f, 1, *_tile_cells(f, tile_pixels))  # [B, C, h, w]
    else:
        raw = encode(pixels)  # [B, C, h, w]
    return (raw - vae.config.shift_factor) * vae.config.scaling_factor


def _one_image_at_a_time(code: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`code` run on each image of a batch in turn, so a VAE's activations stay those of one image however many
    there are; batching gains a VAE little. Four 512 px Flux VAE decodes in bf16 on a 2-core CPU peaked at 0.75 GB
    RSS in 27.6 s one by one, at 1.94 GB in 28.6 s as a batch."""
    return lambda x: torch.cat([code(one) for one in x.split(1)])  # [B, ...]


def _param_dtype(vae: nn.Module) -> torch.dtype:
    return next(vae.parameters()).dtype


def _tile_cells(f: int, tile_pixels: int) -> tuple[int, int]:
    """(tile side, overlap) in latent cells for a VAE of compression f."""
    if tile_pixels % f or tile_pixels // f < 2:
        raise ValueError(f"tile_pixels must be a multiple of {f} and at least {2 * f}, got {tile_pixels}")
    tile = tile_pixels // f
    return tile, max(1, round(tile * TILE_OVERLAP))


def _use_tiles(tiled: bool | None, grid: tuple[int, int], f: int, tile_pixels: int) -> bool:
    if tiled is not None:
        return tiled
    tile, _ = _tile_cells(f, tile_pixels)
    return grid[0] * grid[1] > tile * tile


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of `tile` cells that cover [0, n) with neighbours sharing >= `overlap` cells.

    The tiles are spread evenly, so the first starts at 0 and the last ends at n. A side no longer than
    a tile is one (shorter) tile.
    """
    if n <= tile:
        return [0]
    count = math.ceil((n - overlap) / (tile - overlap))
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _axis_weights(starts: list[int], tile: int, scale: int) -> list[torch.Tensor]:
    """Blend weights along one axis, one vector of tile * scale pixels per tile.

    Neighbours crossfade linearly across their whole overlap: at its j-th pixel the one weight rises as
    (j + 0.5) / overlap while the other falls, so the pair sums to 1. Edges of the image are not ramped.
    """
    weights = []
    for k, start in enumerate(starts):
        w = torch.ones(tile * scale)
        if k > 0:
            rise = (starts[k - 1] + tile - start) * scale
            w[:rise] = torch.minimum(w[:rise], (torch.arange(rise) + 0.5) / rise)
        if k + 1 < len(starts):
            fall = (start + tile - starts[k + 1]) * scale
            w[-fall:] = torch.minimum(w[-fall:], (torch.arange(fall) + 0.5).flip(0) / fall)
        weights.append(w)
    return weights


def _blend_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, in_scale: int, out_scale: int, tile: int, overlap: int
) -> torch.Tensor:
    """fn applied to overlapping tiles of x, the outputs blended into one.

    Tiles are laid out on the latent grid: one cell is `in_scale` input pixels square and becomes
    `out_scale` output pixels square (decode: 1 -> f; encode: f -> 1), of the C_out channels fn gives. Where
    tiles overlap, the output is the average of theirs weighted by linear ramps (see `_axis_weights`),
    accumulated in fp32.
    """
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    tile_h, tile_w = min(tile, grid_h), min(tile, grid_w)
    tops, lefts = _tile_starts(grid_h, tile, overlap), _tile_starts(grid_w, tile, overlap)
    row_weights, col_weights = _axis_weights(tops, tile_h, out_scale), _axis_weights(lefts, tile_w, out_scale)
    total = weight = None
    for top, row_weight in zip(tops, row_weights):
        for left, col_weight in zip(lefts, col_weights):
            piece = fn(x[..., top * in_scale : (top + tile_h) * in_scale, left * in_scale : (left + tile_w) * in_scale])
            if total is None:
                total = piece.new_zeros((*piece.shape[:2], grid_h * out_scale, grid_w * out_scale), dtype=torch.float32)
                weight = piece.new_zeros((grid_h * out_scale, grid_w * out_scale), dtype=torch.float32)
            w = torch.outer(row_weight, col_weight).to(total.device)  # [tile_h * out_scale, tile_w * out_scale]
            rows = slice(top * out_scale, (top + tile_h) * out_scale)
            cols = slice(left * out_scale, (left + tile_w) * out_scale)
            total[..., rows, cols] += piece.float() * w
            weight[rows, cols] += w
    return (total / weight).to(piece.dtype)  # [B, C_out, grid_h * out_scale, grid_w * out_scale]
