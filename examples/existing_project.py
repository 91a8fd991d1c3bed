"""Adding lit_compress to a Lightning project that was not written for it.

The LightningModule below is an ordinary one: nothing in it knows about lit_compress. Adding two
callbacks to the Trainer gives it a structural event during training (here: BatchNorm folding at
the start of epoch 2) and a compression report. Afterwards the example shows the three ways back
to the compressed model:

1. ``lit_compress.load_from_checkpoint(MyNet, path)`` — strict loading of a compressed checkpoint
   into the user's own class (the surgery log is replayed before the weights load);
2. ``lit_compress.export_compressed`` / ``load_compressed`` — a state dict plus the event log;
3. the ``.pt2`` written by ``torch.export``, which loads with torch alone.

Run it from the repository root (about 30 s on 2 CPU cores):

    python examples/existing_project.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lit_compress
from lit_compress.callbacks import CompressionReport, FoldBatchNorm
from lit_compress.data import MNIST5kDataModule


class MyNet(L.LightningModule):
    """The user's own model: a plain CNN, written with no thought of compression."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Build from self.parameters() on every call: lit_compress calls this again after an event.
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main(out: Path) -> None:
    L.seed_everything(0)
    model = MyNet()
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", save_last=True)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        default_root_dir=str(out),
        callbacks=[
            FoldBatchNorm(at_epoch=2),  # <- the only lines added to the project
            CompressionReport(measure_latency=True),
            checkpoint,
        ],
    )
    trainer.fit(model, datamodule=MNIST5kDataModule(batch_size=64))

    # 1. Strict loading of the compressed checkpoint into the user's unchanged class.
    restored = lit_compress.load_from_checkpoint(MyNet, checkpoint.last_model_path).eval()
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(restored(x), model(x))
    print("checkpoint restored with the folded architecture:", restored.body[1])

    # 2./3. Export: a state dict + event log, and a torch.export program.
    paths = lit_compress.export_compressed(model, out / "mynet_compressed.pt", example_inputs=x)
    reloaded = lit_compress.load_compressed(paths["state"])
    torch.testing.assert_close(reloaded(x), model(x))
    if "pt2" in paths:
        program = torch.export.load(paths["pt2"]).module()  # torch only: no lit_compress, no Lightning
        torch.testing.assert_close(program(x), model(x))
        print("torch.export program:", paths["pt2"])


if __name__ == "__main__":
    main(Path(tempfile.mkdtemp(prefix="lit_compress_example_")))
