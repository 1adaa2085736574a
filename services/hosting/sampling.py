"""The wire's sampling parameters as the engine takes them: converted at the boundary, and
checked by the engine's own rules (the front ends check before sending, workers on arrival)."""

from __future__ import annotations

from dataclasses import asdict

from common.messages.work import Sampling
from engine.api import SamplingParams


def engine_sampling(s: Sampling) -> SamplingParams:
    """``s`` as the engine's parameters; ValueError naming the first value the engine refuses."""
    return SamplingParams(**{**asdict(s), "stop": tuple(s.stop)})


def wire_sampling(p: SamplingParams) -> Sampling:
    """The engine's parameters as the wire carries them (a request that continues elsewhere)."""
    return Sampling(**{**asdict(p), "stop": tuple(p.stop)})


def checked(s: Sampling) -> Sampling:
    """``s`` itself once the engine would take it; ValueError otherwise."""
    engine_sampling(s)
    return s
