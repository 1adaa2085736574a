"""Choosing next tokens for the whole running batch in one pass.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then invert the CDF
with one uniform number drawn from the request's own ``torch.Generator`` (always on the CPU), so a
request's tokens depend only on its seed and its logits, never on its batch neighbours or device.
"""

from __future__ import annotations

import hashlib

import torch

from engine.api import SamplingParams


def make_generator(request_id: str, params: SamplingParams) -> torch.Generator:
    seed = params.seed
    if seed is None:  # stable across processes (unlike hash())
        seed = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little") >> 1
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def generator_state(gen: torch.Generator) -> bytes:
    return gen.get_state().numpy().tobytes()


def restore_generator(state: bytes) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> list[int]:
    """logits (B, V) float32 -> one token id per row."""
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        picked = _sample_rows(logits[rows].cpu(), [params[i] for i in rows], [gens[i] for i in rows])
        for i, token in zip(rows, picked.tolist()):
            tokens[i] = token
    return tokens


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> torch.Tensor:
    b, v = logits.shape
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    u = torch.cat([torch.rand(1, generator=g) for g in gens])  # (b,) one draw per request
    logits = logits / temps[:, None]
    if all(p.top_k == 0 and p.top_p >= 1.0 for p in params):
        probs = torch.softmax(logits, dim=-1)
        cdf = probs.cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
        return idx.clamp_(max=v - 1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, V)
    rank = torch.arange(v)[None, :]
    top_k = torch.tensor([p.top_k or v for p in params])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill((mass_before >= top_p) & (rank > 0), 0.0)
    cdf = probs.cumsum(-1)
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=v - 1)  # (b, 1)
    return order.gather(1, pos).squeeze(1)
