"""Measurement in pure torch (no Lightning import): parameters, FLOPs, latency.

- :func:`count_parameters`: unique storage, so tied weights count once.
- :func:`count_flops`: ``torch.utils.flop_counter`` on one forward pass in eval mode.
- :func:`measure_latency`: median of timed repeats after warm-up on the real device.
- :func:`model_stats`: the three of them as one dict of plain numbers.
"""

from lit_compress.measure.flops import count_flops, describe_inputs, split_inputs
from lit_compress.measure.latency import measure_latency, percentile, rebatch
from lit_compress.measure.params import count_parameters
from lit_compress.measure.stats import model_stats

__all__ = [
    "count_flops",
    "count_parameters",
    "describe_inputs",
    "measure_latency",
    "model_stats",
    "percentile",
    "rebatch",
    "split_inputs",
]
