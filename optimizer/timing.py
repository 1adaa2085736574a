"""Step times of a pipeline: per-layer profile times, TP all-reduce and pipeline messages.

Model of time (docs/optimizer.md): a stage runs its layers back to back; each layer costs its
profiled time at the stage's TP degree plus two ring all-reduces of the step's activations
(after attention and after the MLP); a stage hands its activations to the next over the link
between them. One batch crosses the pipeline in ``path_s``; a stream of batches leaves it every
``bottleneck_s``. A decode iteration split into m micro-batches takes
max(path(b/m), m * bottleneck(b/m)): each micro-batch needs its previous token before its next
one, and the slowest stage serves all m in turn. When the profile measured it, the last stage also
pays each step's own work besides the layers (LM head, sampling, the engine's bookkeeping) for the
sequences that get logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from optimizer.cluster import allreduce_s, p2p_s
from optimizer.layout import PipelineLayout
from optimizer.model import ModelShape
from optimizer.profile import LayerTimes, StepShape, Values

Seconds = npt.NDArray[np.float64]  # one step's seconds, or many steps' at once


@dataclass(frozen=True)
class PipelineTimer:
    layout: PipelineLayout
    layer_times: dict[int, LayerTimes]  # by TP degree
    model: ModelShape
    # rows -> seconds the last stage spends per step besides its layers
    step_s: Callable[[Values], Seconds] | None = None
    # whole-step correction (``optimizer.calibration.CalibrationTable``): shape -> factor; None: raw profile
    calibration: Callable[[StepShape], np.ndarray] | None = None

    def _calibrated(self, shape: StepShape, seconds: Seconds) -> Seconds:
        """``seconds`` predicted for a whole step of ``shape``, times its calibration factor."""
        return seconds if self.calibration is None else seconds * self.calibration(shape)

    def _layer_s(self, tp: int, shape: StepShape) -> Seconds:
        ar = allreduce_s(self.layout.tp_link, self.model.activation_bytes(shape.tokens), tp)
        return self.layer_times[tp].step_s(shape) + 2 * ar

    def _stage_parts(self, shape: StepShape) -> list[Seconds]:
        """Seconds per stage, in pipeline order."""
        if self.model.encoder_layers:
            pre = StepShape(shape.prefill_seqs, shape.prefill_tokens, shape.prefill_seq)
            dec = StepShape(decode_seqs=shape.decode_seqs, decode_ctx=shape.decode_ctx, enc_seq=shape.enc_seq)
            per_tp_phase = {tp: (self._layer_s(tp, pre), self._layer_s(tp, dec)) for tp in self._tps()}
            return self._with_head(
                [
                    s.encode_layers * per_tp_phase[s.tp][0] + s.decode_layers * per_tp_phase[s.tp][1]
                    for s in self.layout.stages
                ],
                shape,
            )
        per_tp = {tp: self._layer_s(tp, shape) for tp in self._tps()}
        return self._with_head([s.decode_layers * per_tp[s.tp] for s in self.layout.stages], shape)

    def _with_head(self, parts: list[Seconds], shape: StepShape) -> list[Seconds]:
        """The last stage also runs the LM head, sampling and the engine's work per step, for
        every sequence that gets logits (prefilled or decoded, padding included)."""
        if self.step_s is not None:
            parts[-1] = parts[-1] + self.step_s(shape.prefill_seqs + shape.decode_seqs)
        return parts

    def _tps(self) -> set[int]:
        return {s.tp for s in self.layout.stages}

    def _messages(self, shape: StepShape) -> list[float | Seconds]:
        nbytes = self.model.activation_bytes(shape.tokens)
        return [p2p_s(link, nbytes) for link in self.layout.links]

    def _path_and_bottleneck(self, shape: StepShape) -> tuple[Seconds, Seconds]:
        parts, msgs = self._stage_parts(shape), self._messages(shape)
        path = cast(Seconds, sum(parts) + sum(msgs, 0.0))  # sum() types as "| int"; the parts are arrays
        bottleneck = np.maximum.reduce([np.asarray(t + m) for t, m in zip(parts, msgs + [0.0])])
        return path, bottleneck

    def _path_raw(self, shape: StepShape) -> Seconds:
        return cast(Seconds, sum(self._stage_parts(shape)) + sum(self._messages(shape), 0.0))  # (as above)

    def path_s(self, shape: StepShape) -> Seconds:
        """One batch through every stage."""
        return self._calibrated(shape, self._path_raw(shape))

    def bottleneck_s(self, shape: StepShape) -> Seconds:
        """Interval between batches leaving a full pipeline."""
        msgs = self._messages(shape) + [0.0]
        raw = np.maximum.reduce([np.asarray(t + m) for t, m in zip(self._stage_parts(shape), msgs)])
        return self._calibrated(shape, raw)

    def _iteration_raw(self, shape: StepShape, microbatches: Values) -> Seconds:
        path, bottleneck = self._path_and_bottleneck(shape.split(microbatches))
        seconds: Seconds = np.maximum(path, microbatches * bottleneck)
        return seconds

    def iteration_s(self, shape: StepShape, microbatches: Values) -> Seconds:
        """A step over ``shape`` split into ``microbatches`` micro-batches."""
        return self._calibrated(shape, self._iteration_raw(shape, microbatches))

    def _encode_raw(self, shape: StepShape, microbatches: Values = 1) -> Seconds:
        m = np.minimum(np.asarray(microbatches, dtype=float), np.maximum(shape.prefill_seqs, 1.0))
        if not np.any(m > 1):
            return self._path_raw(shape)
        path, bottleneck = self._path_and_bottleneck(shape.split(m))
        seconds: Seconds = path + (m - 1) * bottleneck
        return seconds

    def encode_s(self, shape: StepShape, microbatches: Values = 1) -> Seconds:
        """A one-shot pass of ``shape`` (a prefill) split into ``microbatches`` micro-batches
        that follow each other through the pipeline: the first crosses every stage, each next
        one leaves a bottleneck interval later (the pipeline fills and drains once). A request
        is not split: there are at most as many micro-batches as prompts."""
        return self._calibrated(shape, self._encode_raw(shape, microbatches))

    def mixed_s(self, shape: StepShape, microbatches: Values) -> Seconds:
        """A step that prefills and decodes (continuous batching without chunked prefill): the
        prefill passes the pipeline as its own pass, stalling the decode micro-batches, which
        then run as a decode iteration (the prefill's bubbles and stall, as RRA's encode).
        Calibrated as one step of the whole shape (what a worker measures)."""
        pre = StepShape(shape.prefill_seqs, shape.prefill_tokens, shape.prefill_seq)
        dec = StepShape(decode_seqs=shape.decode_seqs, decode_ctx=shape.decode_ctx, enc_seq=shape.enc_seq)
        has_pre = np.asarray(shape.prefill_seqs) > 0
        has_dec = np.asarray(shape.decode_seqs) > 0
        raw = np.where(has_pre, self._encode_raw(pre, microbatches), 0.0) + np.where(
            has_dec, self._iteration_raw(dec, microbatches), 0.0
        )
        return self._calibrated(shape, raw)


def stage_weight_bytes(layout: PipelineLayout, model: ModelShape) -> np.ndarray:
    """Weights per device of each stage (embeddings on the first and last stage)."""
    out = []
    for i, s in enumerate(layout.stages):
        enc = s.encode_layers * model.encoder_layer_weight_bytes() if model.encoder_layers else 0
        emb = model.embedding_bytes() * ((i == 0) + (i == layout.depth - 1))
        out.append((s.decode_layers * model.decoder_layer_weight_bytes() + enc + emb) / s.tp)
    return np.array(out, dtype=float)


def stage_kv_bytes_per_slot(layout: PipelineLayout, model: ModelShape, slot_tokens: float) -> np.ndarray:
    """KV bytes per device of each stage for one request slot of ``slot_tokens`` positions."""
    return np.array(
        [s.decode_layers * model.kv_bytes_per_token_layer * slot_tokens / s.tp for s in layout.stages], dtype=float
    )


def memory_per_device(
    layout: PipelineLayout, model: ModelShape, slots: npt.ArrayLike, slot_tokens: float
) -> npt.NDArray[np.float64]:
    """Largest per-device memory over the stages with ``slots`` request slots resident."""
    w = stage_weight_bytes(layout, model)
    kv = stage_kv_bytes_per_slot(layout, model, slot_tokens)
    s = np.asarray(slots, dtype=float)[..., None]
    most: npt.NDArray[np.float64] = np.max(w + s * kv, axis=-1)
    return most


def max_slots(layout: PipelineLayout, model: ModelShape, slot_tokens: float, capacity_bytes: float) -> float:
    """Most request slots every stage can hold (may be < 0 when the weights alone do not fit)."""
    w = stage_weight_bytes(layout, model)
    kv = stage_kv_bytes_per_slot(layout, model, slot_tokens)
    return float(np.min((capacity_bytes - w) / kv))
