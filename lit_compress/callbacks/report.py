"""``CompressionReport``: measure the model around every structural event and write the report."""

from __future__ import annotations

import copy
import os
import platform
from typing import Any

import lightning as L
import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_compress.callbacks._args import check_bool, check_int, check_str, check_writable
from lit_compress.callbacks._distributed import broadcast_from_rank_zero
from lit_compress.callbacks._forward import how_to_enable, inputs_from_batch
from lit_compress.callbacks._inputs import isolated_rng, train_batches
from lit_compress.errors import allowed
from lit_compress.inputs import first_samples, inputs_to, rebatch
from lit_compress.surgery.replay import applied_events


class CompressionReport(Callback):
    """Measures parameters, FLOPs and (optionally) latency before and after each structural event.

    Every lit_compress callback uses the first ``CompressionReport`` in the Trainer's callbacks, and
    adds one with the defaults below when there is none. Metrics (``compress/params``,
    ``compress/flops``, ``compress/latency_ms``) go to the Trainer's loggers and into
    ``trainer.callback_metrics`` at the start of training and after every event, so that
    ``ModelCheckpoint(monitor="compress/params", mode="min")`` or ``EarlyStopping`` can use them. At
    fit end the report is written to the log directory as ``compression_report.{json,md,png}`` and
    printed, with a line (and a warning) for every scheduled event that did not run and every
    LayerCollapse slope left short of ``tau``; a fit without any event says "no structural change".

    Latency is the median of ``latency_rounds × latency_repeats`` timed calls, with its p10–p90
    range. At fit end the final model and a copy of the original are timed *together*, in
    interleaved rounds, and a speed-up is printed only when their p10–p90 ranges do not overlap
    (otherwise: "within noise"). The copy costs host memory: the original's parameters and buffers
    once more (logged at fit start; the model's size in MB). Without it (``latency_compare=False``,
    or a resumed fit) the start-of-fit timing is compared, which the report says.

    Args:
        measure_flops: Count FLOPs with ``torch.utils.flop_counter`` on a 2-sample example input.
        measure_latency: Time the model's forward on the training device.
        latency_batch_size: Batch size of the latency input.
        latency_input_shape: Shape of one sample, e.g. ``[3, 224, 224]``; by default the shape of
            the model's ``example_input_array`` or of a training batch.
        latency_repeats: Timed calls per round (each round starts with 3 untimed warm-up calls).
        latency_rounds: Rounds; at fit end the original and the final model alternate, round by round.
        latency_compare: Keep a CPU copy of the model as it starts ``fit``, to time it together with
            the final model at fit end.
        output_dir: Where the report goes; by default the Trainer's ``log_dir``.
        print_report: Print the Markdown table at fit end (rank 0).
    """

    def __init__(
        self,
        measure_flops: bool = True,
        measure_latency: bool = False,
        latency_batch_size: PositiveInt = 1,
        latency_input_shape: list[PositiveInt] | None = None,
        latency_repeats: PositiveInt = 6,
        latency_rounds: PositiveInt = 5,
        latency_compare: bool = True,
        output_dir: str | None = None,
        print_report: bool = True,
    ) -> None:
        for name, flag in (
            ("measure_flops", measure_flops),
            ("measure_latency", measure_latency),
            ("latency_compare", latency_compare),
            ("print_report", print_report),
        ):
            check_bool(name, flag)
        check_int("latency_batch_size", latency_batch_size, 1)
        check_int("latency_repeats", latency_repeats, 1)
        check_int("latency_rounds", latency_rounds, 1)
        if latency_input_shape is not None and (
            isinstance(latency_input_shape, (str, bytes))
            or not isinstance(latency_input_shape, (list, tuple))
            or not latency_input_shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in latency_input_shape)
        ):
            raise allowed("latency_input_shape", latency_input_shape, "a non-empty list of integer sizes >= 1, or None")
        check_str("output_dir", output_dir, optional=True)
        self.measure_flops = measure_flops
        self.measure_latency = measure_latency
        self.latency_batch_size = latency_batch_size
        self.latency_input_shape = list(latency_input_shape) if latency_input_shape else None
        self.latency_repeats = latency_repeats
        self.latency_rounds = latency_rounds
        self.latency_compare = latency_compare
        self.output_dir = output_dir
        self.print_report = print_report
        self.initial: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.latest: dict[str, float] = {}  # the metrics published last, by name (``compress/params``, ...)
        self.paths: dict[str, str] = {}
        self.latency: dict[str, Any] | None = None  # the original and the final model timed together (fit end)
        self.notes: list[str] = []  # what did not happen (fit end)
        self._cached_inputs: Any = None
        self.no_inputs = ""  # why no example input could be determined (empty when one was)
        self._skipped = False  # FLOPs/latency skipped for this fit (warned once)
        self._original: nn.Module | None = None  # CPU copy of the model as it started fit (rank 0)

    # ------------------------------------------------------------------ measurement
    def example_inputs(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> Any:
        """A 2-sample input on the module's device, or ``None`` when none can be determined.

        The module's ``example_input_array`` when set; otherwise the inputs of a training batch, where
        the ``forward`` signature says which part of the batch they are
        (:func:`lit_compress.callbacks._forward.inputs_from_batch`); otherwise ``None`` (why: :attr:`no_inputs`).
        """
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            return inputs_to(example, getattr(pl_module, "device", None))
        if self._cached_inputs is None and trainer is not None:
            with isolated_rng():
                for batch in train_batches(trainer, 1):
                    self._cache_from_batch(pl_module, batch)
        if self._cached_inputs is None:
            return None
        return inputs_to(self._cached_inputs, getattr(pl_module, "device", None))

    def _cache_from_batch(self, pl_module: L.LightningModule, batch: Any) -> None:
        inputs, why = inputs_from_batch(pl_module, batch)
        if inputs is None:
            self.no_inputs = why
        else:
            self._cached_inputs = first_samples(inputs, 2)

    def _skip_measurement(self, pl_module: L.LightningModule, why: str) -> None:
        """Stop measuring FLOPs and latency for this fit, with one warning that says how to enable them."""
        if self._skipped:
            return
        self._skipped = True
        rank_zero_warn(
            f"CompressionReport: FLOPs and latency are not measured for this fit: {why}. {how_to_enable(pl_module)}; "
            "or pass `CompressionReport(measure_flops=False)` to silence this."
        )

    def measure(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> dict[str, Any]:
        """Parameters, FLOPs, latency and the latest validation metrics, measured on rank 0 and broadcast."""
        stats: dict[str, Any] | None = None
        if trainer is None or trainer.is_global_zero:
            stats = self._measure_local(trainer, pl_module)
        if trainer is not None:
            stats = broadcast_from_rank_zero(trainer, stats)
        return dict(stats or {})

    def measure_before_event(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """:meth:`measure`; before the first event of a fresh fit this is also the original's measurement
        (a method callback listed before the report can run an event at fit start, before the report's
        own ``on_train_start``)."""
        if self.initial is None:
            self._start(trainer, pl_module)
            return dict(self.initial or {})
        return self.measure(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = self.measure(trainer, pl_module)
        self.log_stats(trainer, self.initial)
        if self.measure_latency and self.latency_compare and trainer.is_global_zero:
            self._original = _cpu_copy(pl_module)
            if self._original is not None:
                size = sum(
                    t.numel() * t.element_size() for t in [*self._original.parameters(), *self._original.buffers()]
                )
                rank_zero_info(
                    f"[lit_compress] CompressionReport keeps a CPU copy of the model as it starts fit "
                    f"({size / 2**20:.1f} MB of host memory) to time it together with the final model at fit end "
                    "(`latency_compare: false` turns this off)."
                )

    def _measure_local(
        self, trainer: pl.Trainer | None, pl_module: L.LightningModule, latency: bool = True
    ) -> dict[str, Any]:
        from lit_compress.measure import count_flops, count_parameters, measure_latency

        stats: dict[str, Any] = {"params": count_parameters(pl_module), "flops": None, "latency_ms": None}
        wanted = (self.measure_flops or self.measure_latency) and not self._skipped
        inputs = self.example_inputs(trainer, pl_module) if wanted else None
        if wanted and inputs is None:
            self._skip_measurement(pl_module, self.no_inputs or "no example input and no training batch")
        try:
            if self.measure_flops and inputs is not None and not self._skipped:
                stats["flops"] = int(count_flops(pl_module, inputs))
            if self.measure_latency and latency and inputs is not None and not self._skipped:
                lat_inputs = self._latency_inputs(inputs, pl_module)
                result = measure_latency(
                    pl_module, lat_inputs, warmup=5, repeats=self.latency_rounds * self.latency_repeats
                )
                stats.update(_latency_stats(result))
        except Exception as err:  # a measurement never ends the fit
            stats["flops"] = None
            self._skip_measurement(pl_module, f"the forward on the example input failed ({type(err).__name__}: {err})")
        if trainer is not None:
            stats.update(_val_metrics(trainer))
        return stats

    def _measure_final_local(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The final model's stats; with events and the original's copy, both timed together (rank 0)."""
        from lit_compress.measure import measure_interleaved

        original, self._original = self._original, None
        if original is None or not applied_events(pl_module) or not self.measure_latency:
            return {"stats": self._measure_local(trainer, pl_module), "latency": None}
        stats = self._measure_local(trainer, pl_module, latency=False)
        inputs = self.example_inputs(trainer, pl_module)
        if inputs is None or self._skipped:
            return {"stats": stats, "latency": None}
        lat_inputs = self._latency_inputs(inputs, pl_module)
        before, after = measure_interleaved(
            [original, pl_module],
            lat_inputs,
            rounds=self.latency_rounds,
            repeats=self.latency_repeats,
            warmup=3,
            device=pl_module.device,
        )
        stats.update(_latency_stats(after))
        keys = ("rounds", "repeats", "batch_size", "device", "num_threads")
        latency = {"original": _timing(before), "final": _timing(after), **{k: after[k] for k in keys}}
        return {"stats": stats, "latency": latency}

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
    def setup(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """An ``output_dir`` (or ``default_root_dir``) that cannot be written fails here, not after training."""
        if stage == "fit":
            if self.output_dir is not None:
                check_writable("output_dir", self.output_dir, is_dir=True)
            else:
                check_writable("default_root_dir", trainer.default_root_dir, is_dir=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._cached_inputs is None and getattr(pl_module, "example_input_array", None) is None:
            self._cache_from_batch(pl_module, batch)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        if self.initial is None:
            self._start(trainer, pl_module)
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
        final = self._measure_final_local(trainer, pl_module) if trainer.is_global_zero else None
        final = broadcast_from_rank_zero(trainer, final) or {}
        self.final, self.latency = dict(final.get("stats") or {}), final.get("latency")
        self.notes = unfinished_work(trainer, pl_module)
        for note in self.notes:
            rank_zero_warn(note)
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
        report: dict[str, Any] = {
            "events": events,
            "initial": self.initial or {},
            "final": self.final,
            "meta": meta,
            "latency": self.latency,
            "notes": self.notes,
        }
        self.paths = write_report(out_dir, **report)
        if self.print_report:
            text = format_report_markdown(**report)
            rank_zero_info(f"\nlit_compress compression report ({self.paths.get('markdown', out_dir)}):\n{text}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "latest": dict(self.latest)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = state_dict.get("initial")
        self.latest = dict(state_dict.get("latest") or {})


def unfinished_work(trainer: pl.Trainer, pl_module: L.LightningModule) -> list[str]:
    """What the Trainer's lit_compress callbacks set out to do and did not (their ``unfinished`` sentences)."""
    from lit_compress.callbacks.base import CompressionCallback

    notes: list[str] = []
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, CompressionCallback):
            notes += callback.unfinished(trainer, pl_module)
    return notes


def _latency_stats(result: dict[str, Any]) -> dict[str, float]:
    """``latency_ms`` (median), ``latency_p10_ms``, ``latency_p90_ms`` of a timing result."""
    return {
        "latency_ms": float(result["median_ms"]),
        "latency_p10_ms": float(result["p10_ms"]),
        "latency_p90_ms": float(result["p90_ms"]),
    }


def _timing(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(result[k]) for k in ("median_ms", "p10_ms", "p90_ms")}


def _cpu_copy(module: L.LightningModule) -> nn.Module | None:
    """A deep copy of ``module`` on the CPU, without its Trainer reference; ``None`` (warned) if it cannot be copied."""
    trainer = module.__dict__.get("_trainer")
    module.__dict__["_trainer"] = None
    try:
        clone = copy.deepcopy(module)
    except Exception as err:
        rank_zero_warn(
            f"CompressionReport: the model could not be copied ({type(err).__name__}: {err}); at fit end the final "
            "latency is compared with the start-of-fit timing instead of being timed together with the original."
        )
        return None
    finally:
        module.__dict__["_trainer"] = trainer
    return clone.to("cpu")


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
