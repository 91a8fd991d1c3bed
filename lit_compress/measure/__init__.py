"""Measurement in pure torch (no Lightning import): parameters, FLOPs, latency, latency tables.

- :func:`count_parameters`: unique storage, so tied weights count once.
- :func:`count_flops`: ``torch.utils.flop_counter`` on one forward pass in eval mode.
- :func:`measure_latency`: median (and 10th/90th percentiles) of timed repeats after warm-up on
  the real device; :func:`measure_interleaved`: several models timed together, in interleaved
  rounds, so that their latencies can be compared on a loaded machine.
- :mod:`lit_compress.measure.latency_table`: per-candidate latency tables, cached per device.
"""

from lit_compress.measure.flops import count_flops
from lit_compress.measure.latency import measure_interleaved, measure_latency, percentile
from lit_compress.measure.params import count_parameters

__all__ = ["count_flops", "count_parameters", "measure_interleaved", "measure_latency", "percentile"]
