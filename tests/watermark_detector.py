"""A watermark detector written from Kirchenbauer et al. (2023), "A Watermark for Large Language Models", §3 / §4
(the one-proportion z-test), with TGI's green-list hashing: the previous token id times 15485863 seeds a torch
generator, and the first int(V * gamma) ids of `torch.randperm(V)` from it are green. Independent of Loom's own
code on purpose: it is the oracle Loom's watermark must satisfy."""

from __future__ import annotations

import math

import torch


def green_list(previous_token: int, vocab_size: int, gamma: float) -> set[int]:
    generator = torch.Generator().manual_seed(15485863 * previous_token)
    return set(torch.randperm(vocab_size, generator=generator)[: int(vocab_size * gamma)].tolist())


def z_score(prompt_ids: list[int], generated_ids: list[int], vocab_size: int, gamma: float = 0.5) -> float:
    """z = (|s|_G - gamma T) / sqrt(T gamma (1 - gamma)) over the T generated tokens, each green or not for the
    green list of the token before it."""
    sequence = list(prompt_ids[-1:]) + list(generated_ids)
    green = sum(1 for prev, tok in zip(sequence, sequence[1:]) if tok in green_list(prev, vocab_size, gamma))
    t = len(generated_ids)
    return (green - gamma * t) / math.sqrt(t * gamma * (1 - gamma))
