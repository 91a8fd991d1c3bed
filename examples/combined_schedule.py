"""A combined compression schedule added to an existing Lightning project, then export and inference.

``UserCNN`` below is an ordinary LightningModule: nothing in it knows about lit_compress. Three
callbacks added to the Trainer compress three parts of it during one ``fit`` (each method claims
its own layers; an overlap would be refused before the first step):

* ``LayerCollapse`` on the classifier's last MLP (its ReLU becomes a slope that a warm-up penalty
  drives to 1; the two Linears then collapse into one);
* ``ALDS`` on the classifier's first, largest Linear (globally allocated low rank, at epoch 3);
* ``LayerMerge`` on the conv trunk (a latency-budgeted plan at epoch 2, the final exact merge of
  conv + BN + activation chains into fewer convs at fit end).

The compression report (one row per event: parameters, FLOPs, latency, validation accuracy) is
printed and written beside the logs. The final model is then exported with ``torch.export`` and a
separate Python process that imports **torch only** (no lit_compress, no Lightning, not this file)
loads the ``.pt2`` and classifies the test images with it.

Run it from the repository root (about 2 minutes on 2 CPU cores):

    python examples/combined_schedule.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

import lit_compress
from lit_compress.callbacks import ALDS, CompressionReport, LayerCollapse, LayerMerge
from lit_compress.data import MNIST5kDataModule
from lit_compress.surgery import applied_events


class UserCNN(L.LightningModule):
    """The user's own model: a conv trunk and an MLP classifier for 1x28x28 digits."""

    def __init__(self, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 28, 28)`` → logits ``(B, 10)``."""
        return self.classifier(self.trunk(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        # Built from self.parameters() on every call: lit_compress calls this again after an event.
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)}


def compression_schedule(out: Path) -> list[L.Callback]:
    """The lines added to the project: three methods, each on its own layers, and the report."""
    return [
        LayerCollapse(targets=["classifier.*"], last_n=1, lambda_final=5.0, warmup=2, tau=0.05, penalty="loss"),
        ALDS(keep_ratio=0.35, at_epoch=3, targets=["classifier.1"], rewind_lr=False),
        LayerMerge(
            budget=0.6,
            at_epoch=2,
            importance="loss_proxy",
            latency_batch_size=16,
            latency_cache=str(out / "latency.json"),
        ),
        CompressionReport(measure_latency=True, latency_batch_size=64, output_dir=str(out)),
    ]


INFERENCE_WITH_TORCH_ONLY = textwrap.dedent(
    """
    import sys
    import torch
    program = torch.export.load(sys.argv[1]).module()
    images, labels = torch.load(sys.argv[2])
    with torch.no_grad():
        accuracy = (program(images).argmax(1) == labels).float().mean().item()
    assert not any(m.startswith(("lit_compress", "lightning")) for m in sys.modules), "not torch-only"
    print(f"torch-only inference on {len(labels)} test images: accuracy {accuracy:.2%}")
    """
)


def main(out: Path) -> None:
    L.seed_everything(0)
    model = UserCNN()
    data = MNIST5kDataModule(train_size=1000, batch_size=64, seed=0)
    trainer = L.Trainer(
        max_epochs=8,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=2.0,
        default_root_dir=str(out),
        callbacks=compression_schedule(out),
    )
    trainer.fit(model, datamodule=data)
    print("events:", [e["op"] for e in applied_events(model)])
    print("report:", out / "compression_report.md")

    # Export: a state dict + event log (reloads with lit_compress), and a torch.export program.
    data.setup("test")
    images, labels = map(torch.cat, zip(*list(data.test_dataloader())))
    model.eval()
    paths = lit_compress.export_compressed(model, out / "user_cnn_compressed.pt", example_inputs=images[:2])
    torch.save((images, labels), out / "test_images.pt")
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).float().mean().item()
    print(f"compressed model in this process: accuracy {expected:.2%}")
    # Inference in a fresh interpreter that imports torch only.
    subprocess.run(
        [sys.executable, "-c", INFERENCE_WITH_TORCH_ONLY, paths["pt2"], str(out / "test_images.pt")],
        check=True,
        cwd=out,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lit_compress_combined_")))
