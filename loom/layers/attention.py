"""Attention over the paged KV cache (CPU/portable implementation on torch SDPA).

Writes this step's keys/values into their slots, then attends: all single-token decodes together (on CPU with a
small C++ kernel that reads the blocks in place, see kernels/paged_decode_cpu.py; elsewhere in one padded SDPA
call), each prefill span on its own (a fresh prompt attends to its own K/V without touching the cache).
Layers with logit soft-capping (Gemma 2) attend explicitly instead, since SDPA cannot cap the scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.layers.forward_context import AttentionMetadata, PrefillSpan, get_forward_context
from loom.layers.kernels import fused_cpu, paged_decode_cpu, prefill_attention_cpu


class Attention(nn.Module):
    def __init__(
        self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
        sliding_window: int | None = None, softcap: float | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap  # scores → tanh(scores / softcap) * softcap before the mask and softmax
        # An fp8 cache holds k / k_scale and v / v_scale (a checkpoint's calibrated scales; 1.0 without them, TGI)
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (T, Hq, D); k, v: (T, Hkv, D) → (T, Hq, D)."""
        ctx = get_forward_context()
        meta = ctx.attn
        cache = ctx.kv_caches[self.layer_idx]  # (2, slots, Hkv, D)
        # an fp8 cache (--kv-cache-dtype) stores the values rounded to it, unscaled; this step's fresh prompt
        # tokens still attend to their own unrounded keys and values, as TGI's prefill does
        k_stored, v_stored = (k, v) if cache.dtype == k.dtype else (self._to_cache(k, self.k_scale, cache.dtype),
                                                                    self._to_cache(v, self.v_scale, cache.dtype))
        if not paged_decode_cpu.store_kv(cache, meta.slot_mapping, k_stored, v_stored):
            cache[0].index_copy_(0, meta.slot_mapping, k_stored)
            cache[1].index_copy_(0, meta.slot_mapping, v_stored)
        if meta.num_decodes == q.shape[0]:  # a step of decodes only: no output to assemble
            return self._decode(q, cache, meta)
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], cache, meta)
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.q_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], cache, span)
        return out

    @staticmethod
    def _to_cache(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        return (x if scale == 1.0 else x / scale).to(dtype)

    def _from_cache(self, keys: torch.Tensor, values: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys/values in `dtype`; from an fp8 cache, times their scales (a 16-bit cache holds them as is)."""
        scaled = keys.dtype in paged_decode_cpu.FP8_DTYPES
        keys, values = keys.to(dtype), values.to(dtype)
        if not scaled:
            return keys, values
        if self.k_scale != 1.0:
            keys = keys * self.k_scale
        if self.v_scale != 1.0:
            values = values * self.v_scale
        return keys, values

    def decode_fused_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         rotary_dim: int) -> torch.Tensor | None:
        """A step of decodes only, on CPU, from a fused qkv projection (T, (Hq + 2 Hkv) * D) without q/k norms:
        NeoX rotary (tables cos/sin), the cache write and the attention in two kernel calls → (T, Hq, D). None
        when that path does not apply (another device, a prefill row, soft-capping); the caller then runs
        `forward`. At one token per step the split, views, rotary and store calls this saves were ~25% of the
        time a layer spent outside its matmuls."""
        ctx = get_forward_context()
        meta = ctx.attn
        if meta.num_decodes != qkv.shape[0] or self.softcap is not None or qkv.device.type != "cpu":
            return None
        if paged_decode_cpu.load() is None:
            return None
        cache = ctx.kv_caches[self.layer_idx]
        q = fused_cpu.rope_store(qkv, cos, sin, positions, rotary_dim, self.num_heads, self.num_kv_heads, cache,
                                 meta.slot_mapping)
        if q is None:
            return None
        return self._decode(q, cache, meta)

    def _decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        fp8 = cache.dtype in paged_decode_cpu.FP8_DTYPES
        if (fp8 or cache.dtype == q.dtype) and self.softcap is None and q.device.type == "cpu" \
                and paged_decode_cpu.load() is not None:
            # reads each cached key/value once, straight from the blocks (no gather, no cast copies). An fp8
            # cache's scales: q . (k_scale k8) = k_scale (q . k8), p @ (v_scale v8) = v_scale (p @ v8)
            k_scale, v_scale = (self.k_scale, self.v_scale) if fp8 else (1.0, 1.0)
            out = paged_decode_cpu.paged_decode(
                q, cache[0], cache[1], meta.decode_block_tables, meta.decode_lens, meta.block_size,
                self.scale * k_scale, self.sliding_window,
            )
            return out if v_scale == 1.0 else out * v_scale
        keys = cache[0][meta.decode_slots].transpose(1, 2)  # (Bd, Hkv, Lmax, D)
        values = cache[1][meta.decode_slots].transpose(1, 2)
        out_dtype = q.dtype
        if keys.dtype != q.dtype:  # an fp8 cache
            keys, values = self._from_cache(keys, values, q.dtype)
        q = q.unsqueeze(2)  # (Bd, Hq, 1, D)
        if self.softcap is not None:
            o = self._softcapped(q, keys, values, meta.decode_mask(self.sliding_window))  # (Bd, Hq, 1, D)
            return o.squeeze(2).to(q.dtype)
        # NOTE: torch's CPU SDPA with a mask is ~6x slower in bf16 than in fp32 for single-token queries
        # (measured: 8.2 ms vs 1.3 ms incl. the casts, batch 16, 272 keys), so decode attention runs in fp32.
        upcast = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        if upcast:
            q, keys, values = q.float(), keys.float(), values.float()
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=meta.decode_mask(self.sliding_window), scale=self.scale, enable_gqa=True,
        )  # (Bd, Hq, 1, D)
        return o.squeeze(2).to(out_dtype)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, span: PrefillSpan
    ) -> torch.Tensor:
        if span.bidirectional and self.softcap is None:  # not causal: the explicit mask
            keys = cache[0][span.slots].transpose(0, 1)
            values = cache[1][span.slots].transpose(0, 1)
            if keys.dtype != q.dtype:
                keys, values = self._from_cache(keys, values, q.dtype)
            return self._sdpa(q.transpose(0, 1), keys, values, self._prefill_mask(span)).transpose(0, 1)
        if cache.dtype == q.dtype and prefill_attention_cpu.applies(q, self.head_dim, self.softcap):
            # bf16 dot products straight from the cache (this step's K/V are written already): 3-4x SDPA's flash
            # kernel on a 256-token prompt, and a continued chunk needs no gather
            return prefill_attention_cpu.prefill_attention(q, cache[0], cache[1], span.slots,
                                                           span.ctx_len - span.q_len, self.scale, self.sliding_window)
        qh = q.transpose(0, 1)  # (Hq, q_len, D)
        if self.softcap is not None:
            return self._prefill_softcapped(qh, k, v, cache, span)
        fresh = span.ctx_len == span.q_len
        if fresh and (self.sliding_window is None or span.q_len <= self.sliding_window):
            return self._sdpa(qh, k.transpose(0, 1), v.transpose(0, 1), None).transpose(0, 1)
        keys = cache[0][span.slots].transpose(0, 1)  # (Hkv, ctx_len, D)
        values = cache[1][span.slots].transpose(0, 1)
        if keys.dtype != q.dtype:  # an fp8 cache widens here
            keys, values = self._from_cache(keys, values, q.dtype)
        return self._sdpa(qh, keys, values, self._prefill_mask(span)).transpose(0, 1)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (Hq, Lq, D), k/v (Hkv, Lk, D) → (Hq, Lq, D); causal when `mask` is None.

        On CPU the flash kernel only runs for 4-D inputs with as many key as query heads; otherwise SDPA takes its
        math path (3x slower for a 256-token prompt), so keys and values are expanded to the query heads there."""
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                  enable_gqa=True)
        group = q.shape[0] // k.shape[0]
        if group > 1:
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                           is_causal=mask is None, scale=self.scale)
        return o.squeeze(0)

    def _prefill_mask(self, span: PrefillSpan) -> torch.Tensor:
        q_pos = torch.arange(span.ctx_len - span.q_len, span.ctx_len).unsqueeze(1)  # (q_len, 1)
        k_pos = torch.arange(span.ctx_len).unsqueeze(0)  # (1, ctx_len)
        mask = k_pos <= q_pos
        both = torch.zeros_like(mask)
        for a, b in span.bidirectional:  # both ways within the range (transformers: OR(causal, block))
            both |= (q_pos >= a) & (q_pos < b) & (k_pos >= a) & (k_pos < b)
        if self.sliding_window is not None:
            inside = k_pos > q_pos - self.sliding_window
            mask &= inside
            if span.window_bounds_bidirectional:
                both &= inside
        return mask | both

    def _prefill_softcapped(
        self, qh: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, span: PrefillSpan
    ) -> torch.Tensor:
        """qh: (Hq, q_len, D) → (q_len, Hq, D), in query blocks so the float32 scores stay within _SCORE_BUDGET."""
        if span.ctx_len == span.q_len:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)  # (Hkv, ctx_len, D): a fresh prompt is all new
        else:
            keys = cache[0][span.slots].transpose(0, 1)
            values = cache[1][span.slots].transpose(0, 1)
        keys, values = self._from_cache(keys, values, torch.float32)  # once, not per query block
        mask = self._prefill_mask(span)  # (q_len, ctx_len)
        rows = max(1, _SCORE_BUDGET // (self.num_heads * span.ctx_len))
        out = [
            self._softcapped(qh[:, i : i + rows], keys, values, mask[i : i + rows])
            for i in range(0, span.q_len, rows)
        ]
        return torch.cat(out, dim=1).transpose(0, 1).to(qh.dtype)

    def _softcapped(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Explicit attention with soft-capped scores, all in float32 (transformers' eager order: scale, cap, mask,
        softmax). q: (..., Hq, Lq, D); keys, values: (..., Hkv, Lk, D); mask: bool, broadcastable to
        (..., Lq, Lk) with leading dims that are 1 or the batch → float32 (..., Hq, Lq, D)."""
        *lead, hq, lq, d = q.shape
        hkv = keys.shape[-3]
        qg = q.float().reshape(*lead, hkv, hq // hkv, lq, d)  # query head h reads kv head h // group
        scores = qg @ keys.float().unsqueeze(-3).transpose(-1, -2) * self.scale  # (..., Hkv, G, Lq, Lk)
        assert self.softcap is not None
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return (probs @ values.float().unsqueeze(-3)).reshape(*lead, hq, lq, d)


# float32 elements of explicit attention scores per block of queries (64 Mi elements = 256 MiB)
_SCORE_BUDGET = 1 << 26
