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


def penalise(logits: torch.Tensor, params: list[SamplingParams], history: list[list[int]]) -> torch.Tensor:
    """Presence and frequency penalties on the rows that ask for them (OpenAI's definition: a
    token's logit drops by presence x [generated before] + frequency x [times generated])."""
    rows = [i for i, p in enumerate(params) if p.penalised and history[i]]
    if not rows:
        return logits
    logits = logits.clone()
    v = logits.shape[1]
    for i in rows:
        ids = torch.tensor(history[i], dtype=torch.int64)
        counts = torch.bincount(ids[ids < v], minlength=v).to(logits.device, logits.dtype)
        p = params[i]
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def hold_back_stops(
    logits: torch.Tensor, params: list[SamplingParams], history: list[list[int]], stop_ids: frozenset[int]
) -> torch.Tensor:
    """Rows that have generated fewer than their ``min_tokens`` cannot pick an end-of-sequence
    token: its logit is -inf."""
    rows = [i for i, p in enumerate(params) if p.min_tokens and len(history[i]) < p.min_tokens]
    if not rows or not stop_ids:
        return logits
    logits = logits.clone()
    ids = torch.tensor(sorted(t for t in stop_ids if 0 <= t < logits.shape[1]), dtype=torch.int64)
    logits[torch.tensor(rows)[:, None], ids[None, :].to(logits.device)] = float("-inf")
    return logits


def logprobs_of(
    logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]
) -> list[tuple[float | None, tuple[tuple[int, float], ...]]]:
    """Per row: the chosen token's log-probability and the ``logprobs`` likeliest (token, log-prob),
    for the rows that ask for them; (None, ()) for the others."""
    out: list[tuple[float | None, tuple[tuple[int, float], ...]]] = [(None, ())] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    logp = torch.log_softmax(logits[rows].float(), dim=-1).cpu()
    k = max(params[i].logprobs or 0 for i in rows)  # not None in these rows
    best = logp.topk(k, dim=-1) if k else None
    for j, i in enumerate(rows):
        chosen = float(logp[j, tokens[i]])
        want = params[i].logprobs
        top: tuple[tuple[int, float], ...] = ()
        if want and best is not None:  # want > 0: so is k
            top = tuple(zip(best.indices[j, :want].tolist(), best.values[j, :want].tolist()))
        out[i] = (chosen, top)
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> list[int]:
    """logits (B, V) float32 -> one token id per row.

    Each row's method depends only on its own params (greedy, plain sampling, or filtered
    sampling), never on which other rows share the batch.
    """
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    plain = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_k == 0 and p.top_p >= 1.0]
    filtered = [i for i, p in enumerate(params) if p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0)]
    for rows, method in ((plain, _sample_plain), (filtered, _sample_filtered)):
        if rows:
            rows_logits = logits[rows].cpu()  # the best at 0 first: a tiny temperature cannot overflow to inf
            rows_logits = (rows_logits - rows_logits.amax(-1, keepdim=True)) / torch.tensor(
                [params[i].temperature for i in rows]
            )[:, None]
            u = torch.cat([torch.rand(1, generator=gens[i]) for i in rows])  # (b,) one draw per request
            picked = method(rows_logits, [params[i] for i in rows], u)
            for i, token in zip(rows, picked.tolist()):
                tokens[i] = token
    return tokens


def _sample_plain(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over the whole vocabulary: (b, V) -> (b,)."""
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return idx.clamp_(max=logits.shape[1] - 1)


def _sample_filtered(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p on the sorted distribution, then inverse CDF: (b, V) -> (b,)."""
    v = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, V)
    rank = torch.arange(v)[None, :]
    top_k = torch.tensor([min(p.top_k, v) or v for p in params])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill((mass_before >= top_p) & (rank > 0), 0.0)
    cdf = probs.cumsum(-1)
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=v - 1)  # (b, 1)
    return order.gather(1, pos).squeeze(1)
