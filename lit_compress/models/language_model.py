"""``CausalLanguageModel``: a LightningModule around :class:`~lit_compress.models.transformer.TransformerLM`."""

import math
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn
from torch.nn import functional as F

from lit_compress.checkpointing import CompressMixin
from lit_compress.errors import allowed
from lit_compress.models.classifier import lambda_lr_at
from lit_compress.models.transformer import TransformerLM, check_transformer_args

_NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.Embedding,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
)
if hasattr(nn, "RMSNorm"):
    _NO_DECAY_MODULES = (*_NO_DECAY_MODULES, nn.RMSNorm)


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and of those that don't.

    Walks the modules by name and takes each parameter once (a tied weight counts at its first
    owner, e.g. the token embedding). No decay: biases, parameters of norm layers and embeddings,
    and any parameter with fewer than 2 dimensions; decay: every other (weight matrix / kernel).
    """
    seen: set[int] = set()
    decay: list[str] = []
    no_decay: list[str] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            skip = param_name.endswith("bias") or isinstance(module, _NO_DECAY_MODULES) or param.ndim < 2
            (no_decay if skip else decay).append(full)
    return decay, no_decay


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups ``[decay (weight_decay), no decay (0.0)]`` as split by :func:`split_decay`."""
    decay, no_decay = split_decay(model)
    params = dict(model.named_parameters())
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_ratio``
    at ``total_steps`` (constant 1 after warm-up when ``total_steps`` is None)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLanguageModel(CompressMixin, L.LightningModule):
    """Next-token language modelling with a decoder-only transformer, AdamW and warm-up + cosine.

    Args:
        vocab_size: Vocabulary size. Left unset (None) in a ``lit_compress`` CLI config, it is filled
            in from the DataModule's ``vocab_size``; it must be set when the class is built directly.
        block_size: Context length.
        n_layer: Transformer blocks.
        n_head: Attention heads.
        d_model: Model width.
        dropout: Dropout probability.
        activation: MLP activation.
        tie_embeddings: Tie the output head to the token embedding.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay on weight matrices (not on biases, norms, embeddings).
        warmup_steps: Linear warm-up steps; a cosine decay to 10 % of ``lr`` follows until the
            trainer's ``estimated_stepping_batches``.
        architecture: ``"transformer"`` (ours), or a Hugging Face ``"gpt2"`` / ``"bert"`` (as a
            decoder) structure of the same size, built from a config (needs the ``hf`` extra;
            ``activation`` and ``tie_embeddings`` then follow the HF defaults).

    Batches are ``(x, y)`` of shape ``(B, T)`` int64, ``y`` being ``x`` shifted by one.
    Logs ``train_loss``, ``val_loss``, ``val_ppl`` (exp of the token-mean validation loss) and
    ``val_bpc`` (bits per token, i.e. per character for a character-level model); ``test_*`` alike.
    """

    def __init__(
        self,
        vocab_size: PositiveInt | None = None,
        block_size: PositiveInt = 128,
        n_layer: PositiveInt = 4,
        n_head: PositiveInt = 4,
        d_model: PositiveInt = 256,
        dropout: NonNegativeFloat = 0.0,
        activation: Literal["gelu", "relu", "silu"] = "gelu",
        tie_embeddings: bool = False,
        lr: PositiveFloat = 3e-4,
        weight_decay: NonNegativeFloat = 0.1,
        warmup_steps: NonNegativeInt = 100,
        architecture: Literal["transformer", "gpt2", "bert"] = "transformer",
    ) -> None:
        super().__init__()
        if vocab_size is None:
            raise allowed(
                "vocab_size",
                vocab_size,
                "must be an int >= 1; set it, or use the lit_compress CLI with a data module that has "
                "`vocab_size` (e.g. ShakespeareDataModule), which fills it in",
            )
        check_transformer_args(vocab_size, block_size, n_layer, n_head, d_model, dropout, activation)
        if not lr > 0:
            raise allowed("lr", lr, "must be > 0")
        if weight_decay < 0:
            raise allowed("weight_decay", weight_decay, "must be >= 0")
        if warmup_steps < 0:
            raise allowed("warmup_steps", warmup_steps, "must be >= 0")
        self.save_hyperparameters()
        if architecture == "transformer":
            self.net: nn.Module = TransformerLM(
                vocab_size, block_size, n_layer, n_head, d_model, dropout, activation, tie_embeddings
            )
        elif architecture in ("gpt2", "bert"):
            from lit_compress.models.hf_lm import HFCausalLM

            self.net = HFCausalLM(architecture, vocab_size, block_size, n_layer, n_head, d_model, dropout)
        else:
            raise allowed("architecture", architecture, "must be 'transformer', 'gpt2' or 'bert'")
        self.val_loss_mean = torchmetrics.MeanMetric()
        self.test_loss_mean = torchmetrics.MeanMetric()
        self.example_input_array = torch.zeros(2, block_size, dtype=torch.long)

    def forward(self, idx: Tensor) -> Tensor:
        """``(B, T)`` token ids -> ``(B, T, V)`` logits."""
        return self.net(idx)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch  # (B, T), (B, T)
        logits = self(x)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch[0].size(0))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_loss_mean.update(self._loss(batch), weight=batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val", self.val_loss_mean)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_loss_mean.update(self._loss(batch), weight=batch[1].numel())

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_loss_mean)

    def _log_epoch_metrics(self, stage: str, metric: torchmetrics.MeanMetric) -> None:
        if metric.update_count == 0:
            return
        loss = metric.compute()
        metric.reset()
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}_ppl", torch.exp(loss), prog_bar=stage == "val")
        self.log(f"{stage}_bpc", loss / math.log(2))

    def configure_optimizers(self) -> Any:
        """AdamW over the current parameters (rebuilt on every call, after surgery too), scheduled per step.

        The schedule starts at the trainer's ``global_step`` (see
        :func:`~lit_compress.models.classifier.lambda_lr_at`), so re-creating it mid-training continues it.
        """
        hp = self.hparams  # read here (not copied in __init__), so that changes to hparams (an LR finder) apply
        lr: float = hp["lr"]
        weight_decay: float = hp["weight_decay"]
        warmup: int = hp["warmup_steps"]
        opt = torch.optim.AdamW(decay_groups(self, weight_decay), lr=lr, betas=(0.9, 0.95))
        trainer = self._trainer
        total: int | None = None
        start = 0
        if trainer is not None:
            steps = trainer.estimated_stepping_batches
            total = int(steps) if math.isfinite(steps) else None
            start = int(trainer.global_step)
        sched = lambda_lr_at(opt, lambda s: warmup_cosine(s, warmup, total), start)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` ``(B, T)``; returns ``(B, T + max_new_tokens)``.

        ``temperature <= 0`` picks the most likely token (greedy); ``top_k`` keeps the k most likely.
        The context is cropped to the last ``block_size`` tokens. Call ``.eval()`` first when the model
        has dropout.
        """
        block_size: int = self.hparams["block_size"]
        for _ in range(max_new_tokens):
            logits = self(idx[:, -block_size:])[:, -1, :]  # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)  # (B, T + 1)
        return idx


__all__ = ["CausalLanguageModel", "decay_groups", "split_decay", "warmup_cosine"]
