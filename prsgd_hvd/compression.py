"""The ``compression=`` option: Horovod's ``Compression`` names, plus ``bf16`` and ``"int8"``.

For model averaging ``compression=hvd.Compression.fp16`` (or ``.bf16``) does not cast the
weights; it selects the 16-bit *delta* wire format (``prsgd_hvd.wire_formats.Delta16``: the
change since the last common average, with error feedback). ``"int8"`` selects the 8-bit one
(``prsgd_hvd.wire_formats.Int8Delta``: per-chunk scales, allgathered); it has no Horovod
``Compressor`` (``hvd.DistributedOptimizer`` has no use for a format that needs an anchor), so
it is named by its string. This module only names the options and resolves them.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["Compression", "BF16Compressor", "resolve_compression"]


def _horovod_compression():
    from horovod.torch.compression import Compression as HorovodCompression
    from horovod.torch.compression import Compressor
    return HorovodCompression, Compressor


_HorovodCompression, _Compressor = _horovod_compression()


class BF16Compressor(_Compressor):
    """bf16 wire format (also usable with ``hvd.DistributedOptimizer`` where Horovod can sum
    bf16; for model averaging ``DistributedLocalSGD`` allgathers it, see the module doc)."""

    @staticmethod
    def compress(tensor):
        ctx = tensor.dtype
        if tensor.dtype.is_floating_point:
            tensor = tensor.to(torch.bfloat16)
        return tensor, ctx

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx) if ctx.is_floating_point else tensor


class Compression(_HorovodCompression):
    """Horovod's ``Compression`` (``none``, ``fp16``) plus ``bf16``."""

    bf16 = BF16Compressor


def resolve_compression(compression: Any) -> Optional[str]:
    """``None``/``Compression.none`` -> None; ``Compression.fp16``/"fp16"; ``.bf16``/"bf16";
    "int8"."""
    if compression is None or compression is _HorovodCompression.none:
        return None
    if compression is _HorovodCompression.fp16 or compression == "fp16":
        return "fp16"
    if compression is BF16Compressor or compression == "bf16":
        return "bf16"
    if compression == "int8":
        return "int8"
    raise ValueError(f"DistributedLocalSGD: 'compression' must be None, hvd.Compression.fp16, "
                     f"hvd.Compression.bf16 (or 'fp16'/'bf16'), or 'int8', got {compression!r}")
