"""``KVHandoff`` on the wire: a versioned msgpack map, KV bytes carried as a binary field."""

from __future__ import annotations

from dataclasses import fields

import msgpack

from engine.api import KVHandoff, SamplingParams

HANDOFF_VERSION = 1


def encode_handoff(h: KVHandoff) -> bytes:
    p = h.params
    return msgpack.packb({
        "v": HANDOFF_VERSION,
        "request_id": h.request_id,
        "model": h.model,
        "params": {**{f.name: getattr(p, f.name) for f in fields(SamplingParams)}, "stop": list(p.stop)},
        "prompt_ids": list(h.prompt_ids),
        "generated_ids": list(h.generated_ids),
        "emitted_text": h.emitted_text,
        "rng_state": h.rng_state,
        "dtype": h.dtype,
        "shape": list(h.shape),
        "layout": h.layout,
        "kv": h.kv,
    }, use_bin_type=True)


def decode_handoff(data: bytes) -> KVHandoff:
    try:
        m = msgpack.unpackb(data, raw=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"not a KV hand-off: {exc}") from exc
    if not isinstance(m, dict) or m.get("v") != HANDOFF_VERSION:
        raise ValueError(f"unsupported KV hand-off version {m.get('v') if isinstance(m, dict) else None!r}")
    try:
        p = m["params"]
        known = {f.name for f in fields(SamplingParams)}  # a field this version lacks keeps its default
        params = SamplingParams(**{**{k: v for k, v in p.items() if k in known}, "stop": tuple(p["stop"])})
        return KVHandoff(
            request_id=m["request_id"], model=m["model"], params=params, prompt_ids=tuple(m["prompt_ids"]),
            generated_ids=tuple(m["generated_ids"]), emitted_text=m["emitted_text"], rng_state=m["rng_state"],
            dtype=m["dtype"], shape=tuple(m["shape"]), layout=m["layout"], kv=m["kv"],
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed KV hand-off: {exc!r}") from exc
