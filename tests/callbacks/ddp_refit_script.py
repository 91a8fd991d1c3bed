"""Run by tests/callbacks/test_ddp.py: two ``fit`` calls under ``strategy="ddp"`` with one LayerCollapse instance.

Under ``ddp`` every process runs this whole script: each keeps its own callback object across the
two fits, and ``plan_event`` runs in rank 0's process only. Whatever a callback needs in the second
fit must therefore be set in ``apply_event`` (every rank), never in ``plan_event``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
import torch
import torch.distributed as dist

from lit_compress.callbacks import CompressionReport, LayerCollapse
from lit_compress.surgery import applied_events
from tests.callbacks._toy import MLPNet, state_hash


def callback_state(callback: LayerCollapse) -> dict[str, Any]:
    """The callback's saved state without the RNG states (plain data, comparable across ranks)."""
    return {k: v for k, v in callback.state_dict().items() if k != "rng"}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = MLPNet(optimizer="sgd", lr=0.05)
    callback = LayerCollapse(lambda_final=20.0, tau=0.3, stage_size=1)
    plan_calls = 0
    plan_event = callback.plan_event

    def counting_plan_event(trainer: Any, pl_module: Any) -> Any:
        nonlocal plan_calls
        plan_calls += 1
        return plan_event(trainer, pl_module)

    callback.plan_event = counting_plan_event  # type: ignore[method-assign]
    report: dict[str, Any] = {"events": []}
    for fit_index, epochs in enumerate((1, 3)):
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out_dir,
            callbacks=[callback, CompressionReport(print_report=False, measure_flops=False)],
        )
        trainer.fit(model)
        rank = trainer.global_rank
        states: list[Any] = [None, None]
        dist.all_gather_object(states, callback_state(callback))
        if states[0] != states[1]:
            print(f"rank {rank}: the ranks' callback states differ after fit {fit_index}: {states}", flush=True)
            sys.exit(3)
        report["events"].append([e["op"] for e in applied_events(model)])
    report.update(plan_calls=plan_calls, hash=state_hash(model), state=callback_state(callback))
    (Path(out_dir) / f"refit_rank{rank}.json").write_text(json.dumps(report))
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
