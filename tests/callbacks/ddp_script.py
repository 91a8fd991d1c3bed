"""Run by tests/callbacks/test_ddp.py as a separate process: `strategy="ddp"` re-launches this script."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
import torch

from lit_compress.callbacks import CompressionReport
from lit_compress.surgery import applied_events
from tests.callbacks._toy import HashRecorder, SplitLinear, ToyNet


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = ToyNet()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=[
            SplitLinear(at_step=2, bn_recalibration_batches=2),
            HashRecorder(out_dir),
            CompressionReport(print_report=False),
        ],
    )
    trainer.fit(model)
    # Under `ddp` the launching process is rank 0 itself: its model is the compressed one.
    assert isinstance(model.mid, torch.nn.Sequential), type(model.mid)
    assert [e["op"] for e in applied_events(model)] == ["test_split_linear"]
    print(f"rank {trainer.global_rank} ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
