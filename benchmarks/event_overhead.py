"""The cost of one structural event's own machinery on a ResNet-18-sized model (2 CPU threads).

Measures the time of: the decision (plan), surgery, DDP re-wrap (a no-op on one process), the
optimizer rebuild with state transplant, and the barrier — the ``wall_s`` of each logged event,
with measurement and BatchNorm re-estimation turned off. Two events are timed: folding every
BatchNorm of torchvision ResNet-18 (11.7 M params; the plan includes a traced forward at
2×3×64×64), and replacing its ``fc`` with a two-layer factorisation (no tracing).

    python -m benchmarks.event_overhead [--repeats 5] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import lightning as L
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import write_results
from lit_compress.callbacks import CompressionCallback, CompressionReport, FoldBatchNorm
from lit_compress.surgery import applied_events, register_replay, replace_submodule
from lit_compress.surgery.log import make_record


class ResNet18Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None, num_classes=10)
        self.example_input_array = torch.zeros(2, 3, 64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)), batch_size=4
        )


@register_replay("bench_factorize_fc")
def _replay(model: nn.Module, record: dict[str, Any]) -> None:
    old = model.get_submodule(record["target"])
    replace_submodule(
        model,
        record["target"],
        nn.Sequential(
            nn.Linear(old.in_features, record["rank"], bias=False), nn.Linear(record["rank"], old.out_features)
        ),
    )


class FactorizeFC(CompressionCallback):
    def event_due(self, trainer: Any, pl_module: Any, moment: str) -> bool:
        return moment == "step" and not self.events_done and trainer.global_step >= 1

    def plan_event(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        return {"target": "net.fc", "rank": 64}

    def apply_event(self, pl_module: Any, plan: dict[str, Any]) -> list[dict[str, Any]]:
        record = make_record("bench_factorize_fc", **plan)
        _replay(pl_module, record)
        return [record]


def time_event(make_callback: Any) -> float:
    model = ResNet18Module()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[make_callback(), CompressionReport(measure_flops=False, print_report=False)],
    )
    trainer.fit(model)
    return float(applied_events(model)[0]["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    rows = []
    for name, factory in [
        ("fold all BatchNorms (traced plan)", lambda: FoldBatchNorm(at_step=1)),
        ("factorize fc (no tracing)", FactorizeFC),
    ]:
        times = [time_event(factory) for _ in range(args.repeats)]
        rows.append(
            {
                "event": name,
                "median_s": statistics.median(times),
                "max_s": max(times),
                "repeats": args.repeats,
                "under_1s": max(times) < 1.0,
            }
        )
    write_results(
        "event_overhead",
        rows,
        {"model": "torchvision resnet18 (11.7 M params)", "threads": args.threads, "seed": 0},
        args.out,
    )


if __name__ == "__main__":
    main()
