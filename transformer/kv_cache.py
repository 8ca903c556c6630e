"""KV caches for incremental decoding with ``fusedattn.decode_attention``.

    cache = KVCache(max_batch=4, max_seq_len=2048, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    out = cache.attend(q, k, v)          # appends k, v (B, Lnew, Hkv, D) in place, attends, advances

    paged = PagedKVCache(num_pages=1024, page_size=16, max_batch=4, max_seq_len=2048, num_kv_heads=8,
                         head_dim=128, dtype=torch.bfloat16)
    out = paged.attend(q, k, v)          # allocates pages as sequences grow
    paged.free(seq)                      # returns a finished sequence's pages to the pool

``KVCache`` holds contiguous (max_batch, max_seq_len, Hkv, D) buffers; ``PagedKVCache`` a pool of
(num_pages, page_size, Hkv, D) pages, a free list and a block table per sequence. Both keep the int32
``seqlens`` (tokens cached per sequence) that decode_attention reads as ``cache_seqlens``, and both work on a
subset of their sequences through ``seq_ids`` (a list or int32 tensor of sequence slots). On the CPU their
K/V buffers come from ``fusedattn.zeros_kv_cache``: backed by transparent huge pages, which decode reads faster.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import fusedattn
from fusedattn.decode import decode_attention
from fusedattn.memory import zeros_kv_cache
from fusedattn.rotary import apply_rotary

__all__ = ["KVCache", "PagedKVCache"]

SeqIds = Optional[Union[Sequence[int], torch.Tensor]]


def _attention_bhld(q, k, v, **kwargs):
    """fusedattn.attention on the caches' (B, L, H, D) layout; returns (B, L, Hq, Dv) (and lse (B, Hq, L))."""
    res = fusedattn.attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=kwargs.pop("causal", True), **kwargs
    )
    if isinstance(res, tuple):
        return res[0].transpose(1, 2), res[1]
    return res.transpose(1, 2)


class _CacheBase(nn.Module):
    """What both caches share: seqlens, the append-and-attend step, and the slot bookkeeping."""

    seqlens: torch.Tensor  # (max_batch,) int32: tokens cached per sequence slot

    def _ids(self, seq_ids: SeqIds, batch: Optional[int] = None) -> torch.Tensor:
        """seq_ids as an int64 tensor on the cache's device (default: slots 0 .. batch-1)."""
        if seq_ids is None:
            n = self.seqlens.shape[0] if batch is None else batch
            if n > self.seqlens.shape[0]:
                raise ValueError(f"batch {n} exceeds the cache's max_batch {self.seqlens.shape[0]}")
            return torch.arange(n, device=self.seqlens.device)
        ids = _integers("seq_ids", seq_ids, self.seqlens.device).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.seqlens.shape[0]):
            raise ValueError(f"seq_ids must be in [0, {self.seqlens.shape[0]}), got {ids.tolist()}")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"seq_ids must be distinct, got {ids.tolist()}")
        return ids

    def _decode_kwargs(self, ids: Optional[torch.Tensor]) -> dict:
        """decode_attention's arguments that address sequences `ids` (None: every slot, in order)."""
        raise NotImplementedError

    def _reserve(self, ids: torch.Tensor, new_lengths: torch.Tensor) -> None:
        """Make room for sequences `ids` to hold new_lengths tokens, for all of them or (raising) for none."""
        raise NotImplementedError

    def _unreserve(self) -> None:
        """Undo the last _reserve (the call that needed the room failed): the cache is as before it."""

    def attend(
        self,
        q: torch.Tensor,
        k_new: Optional[torch.Tensor] = None,
        v_new: Optional[torch.Tensor] = None,
        seq_ids: SeqIds = None,
        **kwargs,
    ):
        """Append k_new / v_new (B, Lnew, Hkv, D) to sequences `seq_ids` (default 0 .. B-1), attend with
        q (B, Lq, Hq, D) over everything cached (``fusedattn.decode_attention``; ``kwargs`` go to it, e.g.
        causal, window, return_lse), then advance their seqlens by Lnew. A prompt into empty sequences
        (Lq == Lnew > 1) is attended with ``fusedattn.attention`` instead: the same result, at prefill speed."""
        ids = self._ids(seq_ids, q.shape[0])
        lnew = 0 if k_new is None else k_new.shape[1]
        whole = seq_ids is None and q.shape[0] == self.seqlens.shape[0]  # every slot, in order: no gathers
        lens = self.seqlens if whole else self.seqlens[ids]  # (B,) int32
        dense_kwargs = {n: x for n, x in kwargs.items() if n not in self._ROTARY_KWARGS}
        if self._prefill_from_empty(q, k_new, v_new, lens, dense_kwargs):
            # A prompt into empty sequences: store it, then attend over k_new / v_new themselves with the
            # dense kernel (a prefill is compute-bound; the decode kernel is built for a few queries). Rotary
            # tables: q and k_new rotate at positions 0 .. Lnew-1 first, as decode_attention would rotate them.
            if kwargs.get("rotary_cos") is not None:
                pos = torch.arange(lnew, device=q.device).expand(q.shape[0], lnew)
                rot = (kwargs["rotary_cos"], kwargs["rotary_sin"], pos, kwargs.get("rotary_interleaved", False))
                q, k_new = apply_rotary(q, *rot), apply_rotary(k_new, *rot)
            self.update(0, k_new, v_new, seq_ids=ids)
            return _attention_bhld(q, k_new, v_new, **dense_kwargs)
        self._reserve(ids, lens + lnew)
        try:
            out = decode_attention(
                q,
                self.k,
                self.v,
                cache_seqlens=lens,
                k_new=k_new,
                v_new=v_new,
                **self._decode_kwargs(None if whole else ids),
                **kwargs,
            )
        except BaseException:
            self._unreserve()  # a failed append holds no pages
            raise
        if whole:
            self.seqlens += lnew
        else:
            self.seqlens[ids] += lnew
        return out

    _DENSE_KWARGS = frozenset({"causal", "scale", "window", "softcap", "return_lse", "backend"})
    _ROTARY_KWARGS = frozenset({"rotary_cos", "rotary_sin", "rotary_interleaved"})

    def _prefill_from_empty(self, q, k_new, v_new, lens, kwargs) -> bool:
        """True when attend() can use fusedattn.attention: several new tokens, one query per new token, every
        named sequence empty, matching dtypes, and only options the dense op shares with decode_attention."""
        return (
            k_new is not None
            and v_new is not None
            and q.shape[1] > 1
            and q.shape[1] == k_new.shape[1]
            and q.shape[0] > 0
            and q.dtype == k_new.dtype == v_new.dtype == self.k.dtype
            and set(kwargs) <= self._DENSE_KWARGS
            and int(lens.max()) == 0
        )

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, seq_ids: SeqIds = None) -> None:
        """Write k_new / v_new (B, Lnew, Hkv, D) after the tokens cached in sequences `seq_ids` and advance
        them, without attending (e.g. a prompt prefilled with another attention call)."""
        ids = self._ids(seq_ids, k_new.shape[0])
        self.update(self.seqlens[ids], k_new, v_new, seq_ids=ids)

    def update(
        self, pos: Union[int, torch.Tensor], k_new: torch.Tensor, v_new: torch.Tensor, seq_ids: SeqIds = None
    ) -> None:
        """Write k_new / v_new (B, Lnew, Hkv, D) at positions pos .. pos+Lnew-1 (an int for all sequences
        or a (B,) tensor) of sequences `seq_ids`, and set their seqlens to pos + Lnew (gpt-fast's
        ``update(input_pos, k, v)``)."""
        ids = self._ids(seq_ids, k_new.shape[0])
        B, lnew = k_new.shape[0], k_new.shape[1]
        if tuple(v_new.shape[:3]) != tuple(k_new.shape[:3]):
            raise ValueError(
                f"k_new and v_new must agree in (B, Lnew, Hkv): {tuple(k_new.shape)} vs {tuple(v_new.shape)}"
            )
        if ids.numel() != B:
            raise ValueError(f"k_new holds {B} sequences but seq_ids names {ids.numel()}")
        start = _integers("pos", pos, self.seqlens.device).expand(B)
        if B and int(start.min()) < 0:
            raise ValueError(f"pos must be >= 0, got {start.tolist()}")
        self._reserve(ids, start + lnew)
        try:
            positions = start[:, None] + torch.arange(lnew, device=start.device)  # (B, Lnew)
            first, second = self._slots(ids, positions)
            self.k[first, second] = k_new.to(self.k.dtype)
            self.v[first, second] = v_new.to(self.v.dtype)
        except BaseException:
            self._unreserve()  # a failed write holds no pages
            raise
        self.seqlens[ids] = (start + lnew).to(torch.int32)

    def _slots(self, ids: torch.Tensor, positions: torch.Tensor):
        """Indices (first, second) with cache[first, second] = positions (B, Lnew) of sequences ids."""
        raise NotImplementedError


def _integers(name: str, x, device) -> torch.Tensor:
    """`x` (an int, a sequence of ints or an integer tensor) as an int64 tensor on `device`; a float, bool or
    complex value is refused (converting it would truncate 1.7 to slot 1, or read True as slot 1)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integers (an int, a list of ints or an integer tensor), got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


class KVCache(_CacheBase):
    """Contiguous cache: k, v (max_batch, max_seq_len, Hkv, D) and seqlens (max_batch,) int32."""

    def __init__(
        self,
        max_batch: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, None] = None,
        head_dim_v: Optional[int] = None,
    ):
        super().__init__()
        shape = (max_batch, max_seq_len, num_kv_heads)
        self.register_buffer("k", zeros_kv_cache((*shape, head_dim), dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "v", zeros_kv_cache((*shape, head_dim_v or head_dim), dtype=dtype, device=device), persistent=False
        )
        self.register_buffer("seqlens", torch.zeros(max_batch, dtype=torch.int32, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[1]

    def reset(self, seq_ids: SeqIds = None) -> None:
        """Forget the cached tokens of sequences `seq_ids` (default: all)."""
        self.seqlens[self._ids(seq_ids)] = 0

    def _reserve(self, ids: torch.Tensor, new_lengths: torch.Tensor) -> None:
        if new_lengths.numel() and int(new_lengths.max()) > self.max_seq_len:
            raise RuntimeError(
                f"KVCache is full: a sequence would hold {int(new_lengths.max())} tokens, "
                f"max_seq_len is {self.max_seq_len}"
            )

    def _decode_kwargs(self, ids: Optional[torch.Tensor]) -> dict:
        return {} if ids is None else {"cache_batch_idx": ids.to(torch.int32)}

    def _slots(self, ids, positions):
        return ids[:, None].expand_as(positions), positions


class PagedKVCache(_CacheBase):
    """Paged cache: a pool of pages k, v (num_pages, page_size, Hkv, D), a free list, and per sequence slot a
    row of ``block_table`` (max_batch, max_seq_len / page_size) int32 naming its pages in order.

    Pages are taken from the free list when a sequence grows past its last page (``attend`` / ``append`` /
    ``update``) and returned by ``free`` / ``reset``. Unused block-table entries hold 0 (a valid page, so no
    kernel can be pointed outside the pool; decode_attention only reads the pages a sequence uses).
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        max_batch: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, None] = None,
        head_dim_v: Optional[int] = None,
    ):
        super().__init__()
        if page_size < 1 or num_pages < 1:
            raise ValueError(f"page_size and num_pages must be >= 1, got {page_size} and {num_pages}")
        if max_seq_len < 0:
            raise ValueError(f"max_seq_len must be >= 0, got {max_seq_len}")
        shape = (num_pages, page_size, num_kv_heads)
        self.page_size = page_size
        self.max_seq_len = max_seq_len  # the block table holds ceil(max_seq_len / page_size) pages: maybe more
        self.register_buffer("k", zeros_kv_cache((*shape, head_dim), dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "v", zeros_kv_cache((*shape, head_dim_v or head_dim), dtype=dtype, device=device), persistent=False
        )
        max_blocks = -(-max_seq_len // page_size)
        self.register_buffer(
            "block_table", torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device), persistent=False
        )
        self.register_buffer("seqlens", torch.zeros(max_batch, dtype=torch.int32, device=device), persistent=False)
        self.free_pages: List[int] = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives page 0 first
        self.pages: List[List[int]] = [[] for _ in range(max_batch)]  # pages of each sequence slot, in order
        self._reserved: List[Tuple[int, int, List[int]]] = []  # the last _reserve's (slot, first block, pages)

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    def free(self, seq_ids: SeqIds = None) -> None:
        """Return the pages of sequences `seq_ids` (default: all) to the pool and empty them."""
        for s in self._ids(seq_ids).tolist():
            self.free_pages.extend(reversed(self.pages[s]))
            self.pages[s] = []
            self.block_table[s] = 0
            self.seqlens[s] = 0

    reset = free

    def _reserve(self, ids: torch.Tensor, new_lengths: torch.Tensor) -> None:
        """Pages for every sequence of the batch, or none: each length is checked, and the pages counted, before
        any page is taken (a batch that runs out leaves the pool, the block table and the sequences as they were).
        """
        self._reserved = []
        grows = []
        for s, length in zip(ids.tolist(), new_lengths.tolist()):
            if length > self.max_seq_len:
                raise RuntimeError(
                    f"PagedKVCache is full: sequence {s} would hold {int(length)} tokens, "
                    f"max_seq_len is {self.max_seq_len}"
                )
            grow = -(-int(length) // self.page_size) - len(self.pages[s])
            if grow > 0:
                grows.append((s, grow))
        needed = sum(g for _, g in grows)
        if needed > len(self.free_pages):
            raise RuntimeError(
                f"PagedKVCache is out of pages: sequences {[s for s, _ in grows]} need {needed} more, "
                f"{len(self.free_pages)} are free"
            )
        for s, grow in grows:
            new = [self.free_pages.pop() for _ in range(grow)]
            first = len(self.pages[s])
            self.pages[s].extend(new)
            self.block_table[s, first : first + grow] = torch.tensor(
                new, dtype=torch.int32, device=self.block_table.device
            )
            self._reserved.append((s, first, new))

    def _unreserve(self) -> None:
        for s, first, new in reversed(self._reserved):
            del self.pages[s][first:]
            self.block_table[s, first : first + len(new)] = 0
            self.free_pages.extend(reversed(new))
        self._reserved = []

    def _decode_kwargs(self, ids: Optional[torch.Tensor]) -> dict:
        return {"block_table": self.block_table if ids is None else self.block_table[ids]}

    def _slots(self, ids, positions):
        pages = self.block_table[ids].to(torch.int64).gather(1, positions // self.page_size)  # (B, Lnew)
        return pages, positions % self.page_size
