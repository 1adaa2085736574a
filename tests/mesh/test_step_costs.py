"""What a worker reports of its steps: their shape in the profile's terms, and a bounded sample."""

import math
from collections import Counter

from common.messages.status import STEP_COSTS_PER_KIND
from optimizer.policies import PrefillChunk, StepPlan
from services.worker.costs import StepSampler, step_cost


def test_a_step_is_described_as_the_profile_costs_it():
    plan = StepPlan(encode=("a", "b"), decode=("c", "d", "e"), padding=1)
    cost = step_cost(plan, {"a": 30, "b": 40}, [10, 20, 30], False, 0.05, 7.0)
    assert (cost.kind, cost.prefill_seqs, cost.prefill_tokens, cost.decode_seqs) == ("mixed", 2, 70, 4)
    assert cost.prefill_seq == math.sqrt((30 ** 2 + 40 ** 2) / 2) and cost.decode_ctx == 20
    assert (cost.seconds, cost.at) == (0.05, 7.0)
    decode = step_cost(StepPlan(decode=("c",)), {}, [12], False, 0.01, 8.0)
    assert (decode.kind, decode.prefill_seqs, decode.decode_seqs) == ("decode", 0, 1)
    # a chunk of 8 tokens starting at 16 does a prompt's attention of sqrt(8 x (2 x 16 + 8))
    chunked = step_cost(StepPlan(chunks=(PrefillChunk("f", 16, 8, False),)), {}, [], True, 0.02, 9.0)
    assert chunked.kind == "prefill" and chunked.fused and chunked.prefill_tokens == 8
    assert chunked.prefill_seq == math.sqrt(8 * 40)


def test_a_heartbeat_carries_a_uniform_sample_bounded_per_kind():
    sampler = StepSampler("w-1")
    for i in range(1000):
        sampler.note(step_cost(StepPlan(decode=("c",)), {}, [i], False, 0.01, float(i)))
    for i in range(3):
        sampler.note(step_cost(StepPlan(encode=("a",)), {"a": 9}, [], False, 0.02, float(i)))
    sample = sampler.drain()
    assert Counter(c.kind for c in sample) == {"decode": STEP_COSTS_PER_KIND, "prefill": 3}
    stamps = sorted(c.at for c in sample if c.kind == "decode")
    assert stamps[-1] > 100  # not just the first steps: drawn from all of them
    assert sampler.drain() == ()  # a new sample starts with each heartbeat
