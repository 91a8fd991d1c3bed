"""``CompressionReport``: measure the model around every structural event and write the report."""

from __future__ import annotations

import os
import platform
from typing import Any

import lightning as L
import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_compress.callbacks._distributed import broadcast_from_rank_zero
from lit_compress.callbacks._inputs import example_inputs
from lit_compress.errors import allowed
from lit_compress.inputs import batch_inputs, first_samples, rebatch
from lit_compress.surgery.replay import applied_events


class CompressionReport(Callback):
    """Measures parameters, FLOPs and (optionally) latency before and after each structural event.

    Every lit_compress callback uses the first ``CompressionReport`` in the Trainer's callbacks, and
    adds one with the defaults below when there is none. Metrics (``compress/params``,
    ``compress/flops``, ``compress/latency_ms``) go to the Trainer's loggers and into
    ``trainer.callback_metrics`` at the start of training and after every event, so that
    ``ModelCheckpoint(monitor="compress/params", mode="min")`` or ``EarlyStopping`` can use them. At
    fit end the report is written to the log directory as ``compression_report.{json,md,png}`` and
    printed.

    Args:
        measure_flops: Count FLOPs with ``torch.utils.flop_counter`` on a 2-sample example input.
        measure_latency: Time the model's forward on the training device (median of repeats).
        latency_batch_size: Batch size of the latency input.
        latency_input_shape: Shape of one sample, e.g. ``[3, 224, 224]``; by default the shape of
            the model's ``example_input_array`` or of a training batch.
        latency_repeats: Timed repeats after 5 warm-up runs.
        output_dir: Where the report goes; by default the Trainer's ``log_dir``.
        print_report: Print the Markdown table at fit end (rank 0).
    """

    def __init__(
        self,
        measure_flops: bool = True,
        measure_latency: bool = False,
        latency_batch_size: PositiveInt = 1,
        latency_input_shape: list[PositiveInt] | None = None,
        latency_repeats: PositiveInt = 20,
        output_dir: str | None = None,
        print_report: bool = True,
    ) -> None:
        if latency_batch_size < 1:
            raise allowed("latency_batch_size", latency_batch_size, "must be an integer >= 1")
        if latency_repeats < 1:
            raise allowed("latency_repeats", latency_repeats, "must be an integer >= 1")
        if latency_input_shape is not None and (
            not latency_input_shape or any(int(d) < 1 for d in latency_input_shape)
        ):
            raise allowed("latency_input_shape", latency_input_shape, "must be a non-empty list of positive sizes")
        self.measure_flops = measure_flops
        self.measure_latency = measure_latency
        self.latency_batch_size = latency_batch_size
        self.latency_input_shape = list(latency_input_shape) if latency_input_shape else None
        self.latency_repeats = latency_repeats
        self.output_dir = output_dir
        self.print_report = print_report
        self.initial: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.latest: dict[str, float] = {}  # the metrics published last, by name (``compress/params``, ...)
        self.paths: dict[str, str] = {}
        self._cached_inputs: Any = None

    # ------------------------------------------------------------------ measurement
    def example_inputs(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> Any:
        """A 2-sample input on the module's device (see :func:`lit_compress.callbacks._inputs.example_inputs`)."""
        if self._cached_inputs is None:
            self._cached_inputs = example_inputs(trainer, pl_module)
            if isinstance(self._cached_inputs, torch.Tensor):
                self._cached_inputs = self._cached_inputs.detach()
        return self._cached_inputs

    def measure(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> dict[str, Any]:
        """Parameters, FLOPs, latency and the latest validation metrics, measured on rank 0 and broadcast."""
        stats: dict[str, Any] | None = None
        if trainer is None or trainer.is_global_zero:
            stats = self._measure_local(trainer, pl_module)
        if trainer is not None:
            stats = broadcast_from_rank_zero(trainer, stats)
        return dict(stats or {})

    def _measure_local(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> dict[str, Any]:
        from lit_compress.measure import count_flops, count_parameters, measure_latency

        stats: dict[str, Any] = {"params": count_parameters(pl_module)}
        inputs = self.example_inputs(trainer, pl_module) if (self.measure_flops or self.measure_latency) else None
        stats["flops"] = None
        if self.measure_flops and inputs is not None:
            stats["flops"] = int(count_flops(pl_module, inputs))
        stats["latency_ms"] = None
        if self.measure_latency and inputs is not None:
            lat_inputs = self._latency_inputs(inputs, pl_module)
            result = measure_latency(pl_module, lat_inputs, warmup=10, repeats=self.latency_repeats)
            stats["latency_ms"] = float(result["median_ms"])
        if trainer is not None:
            stats.update(_val_metrics(trainer))
        return stats

    def _latency_inputs(self, inputs: Any, pl_module: L.LightningModule) -> Any:
        if self.latency_input_shape is not None and isinstance(inputs, torch.Tensor):
            shape = [self.latency_batch_size, *self.latency_input_shape]
            if inputs.is_floating_point():
                return torch.randn(shape, dtype=inputs.dtype, device=inputs.device)
            return torch.zeros(shape, dtype=inputs.dtype, device=inputs.device)
        return rebatch(inputs, self.latency_batch_size)

    def log_stats(self, trainer: pl.Trainer | None, stats: dict[str, Any], prefix: str = "compress") -> None:
        """Publish numeric stats (validation metrics left out) as ``{prefix}/{name}``.

        Every rank puts them into ``trainer.callback_metrics`` (for ``ModelCheckpoint``/``EarlyStopping``
        monitors); rank 0 also sends them to every logger of the Trainer.
        """
        if trainer is None:
            return
        metrics = {
            f"{prefix}/{k}": float(v)
            for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("val")
        }
        self.latest.update(metrics)
        _publish(trainer, metrics)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._cached_inputs is None and getattr(pl_module, "example_input_array", None) is None:
            self._cached_inputs = first_samples(batch_inputs(batch), 2)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        if self.initial is None:
            self.initial = self.measure(trainer, pl_module)
            self.log_stats(trainer, self.initial)
        else:  # a resumed or repeated fit: the monitors see the latest values again (Lightning cleared them)
            _publish(trainer, self.latest)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = _val_metrics(trainer)
        for event in applied_events(pl_module):
            after = event.setdefault("after", {})
            if not any(k.startswith("val") for k in after):
                after.update(metrics)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        self.final = self.measure(trainer, pl_module)
        out_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir  # log_dir is collective
        if trainer.is_global_zero:
            self._write(trainer, pl_module, out_dir)
        # Keep the ranks together until the report is written: a worker that exits (and tears down
        # its gloo process group) while rank 0 is still busy was seen to abort under `ddp_spawn`.
        trainer.strategy.barrier("lit_compress.report")

    def _write(self, trainer: pl.Trainer, pl_module: L.LightningModule, out_dir: str) -> None:
        from lit_compress.report import format_report_markdown, write_report

        events = [dict(e) for e in applied_events(pl_module)]
        meta = run_metadata(trainer)
        self.paths = write_report(out_dir, events=events, initial=self.initial or {}, final=self.final, meta=meta)
        if self.print_report:
            text = format_report_markdown(events=events, initial=self.initial or {}, final=self.final, meta=meta)
            rank_zero_info(f"\nlit_compress compression report ({self.paths.get('markdown', out_dir)}):\n{text}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "latest": dict(self.latest)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = state_dict.get("initial")
        self.latest = dict(state_dict.get("latest") or {})


def _publish(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Put ``metrics`` into ``trainer.callback_metrics`` (as tensors, where Lightning's monitors look)."""
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float64)


def _val_metrics(trainer: pl.Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.startswith("val") and isinstance(value, (torch.Tensor, float, int)):
            v = float(value)
            out[key] = v
    return out


def run_metadata(trainer: pl.Trainer | None) -> dict[str, Any]:
    """Machine, versions and run settings printed beside every report."""
    import lightning

    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(getattr(trainer.strategy, "root_device", "cpu")) if trainer is not None else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "precision": str(getattr(trainer, "precision", "")) if trainer is not None else "",
        "world_size": getattr(trainer, "world_size", 1) if trainer is not None else 1,
        "seed": os.environ.get("PL_GLOBAL_SEED"),
    }
