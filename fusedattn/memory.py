"""Host memory for KV caches: ``zeros_kv_cache`` backs large CPU caches with transparent huge pages.

A decode step reads the whole cache once, so on the CPU it runs at memory speed, and with 4 KiB pages that
speed suffers: every 4 KiB of a sequence's keys is a new page (a TLB miss, and a point where the hardware
prefetchers stop). Backing the cache with 2 MiB pages measured 1-13% faster decode (bf16, B=8, L=4096,
benchmarks/results/README.md) on the CI machine, while a plain copy gains nothing (it is already at the
memory's speed). torch allocates with 4 KiB pages unless ``THP_MEM_ALLOC_ENABLE=1`` is set before it starts;
this allocates the cache itself: an anonymous mapping, 2 MiB aligned, advised ``MADV_HUGEPAGE``. The kernel
honours the advice when transparent huge pages are ``madvise`` or ``always``
(/sys/kernel/mm/transparent_hugepage/enabled); where they are off, or off Linux, the memory is ordinary.
Pages are zeroed by the kernel on first touch (no memset here); where the kernel compacts memory for huge
pages on a fault (defrag ``madvise``, the default), that first touch can take longer on a fragmented machine.
"""

from __future__ import annotations

import mmap
from typing import Sequence, Union

import torch

HUGE_PAGE = 2 << 20  # bytes
MIN_BYTES = HUGE_PAGE  # smaller caches gain nothing: plain torch.zeros


def huge_pages_supported() -> bool:
    """True where an anonymous mapping can be advised to use transparent huge pages (Linux)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def zeros_kv_cache(
    shape: Sequence[int], *, dtype: torch.dtype, device: Union[str, torch.device, None] = None, huge_pages: bool = True
) -> torch.Tensor:
    """A zero-filled contiguous tensor for a KV cache.

    On the CPU, when ``huge_pages`` and the tensor is at least 2 MiB, its memory is an anonymous mapping
    aligned to 2 MiB and advised to use transparent huge pages (the tensor keeps the mapping alive; it is
    released with the last tensor that views it). Elsewhere this is ``torch.zeros(shape, dtype=dtype,
    device=device)``.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    if device.type != "cpu" or not huge_pages or nbytes < MIN_BYTES or not huge_pages_supported():
        return torch.zeros(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # shares the mapping and holds a reference to it
    offset = -raw.data_ptr() % HUGE_PAGE
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    except OSError:  # the kernel refuses the advice (THP compiled out): ordinary pages, still correct
        pass
    return raw[offset : offset + nbytes].view(dtype).view(shape)
