"""Compress a pretrained Hugging Face causal language model inside Lightning training.

A ``transformers`` model loaded with ``from_pretrained`` from a local directory (a download you made
before, or a snapshot from the hub cache) is wrapped in a plain LightningModule, its perplexity is
measured, the depth-compression methods that apply to its structure are scheduled in one ``fit``,
and the perplexity is measured again:

- **ALDS** decomposes the MLP projections (``gate_proj``/``up_proj``/``down_proj`` of a Llama;
  GPT-2's ``Conv1D`` layers are not ``Linear`` and are not decomposed);
- **Layer Fusion** ties similar attention projections (``q_proj``, ``k_proj``, ... of the same shape);
- **LayerCollapse** applies to plain MLPs (``Linear → GELU → Linear``: GPT-2, BERT); a gated MLP
  ``down(act(gate(x)) * up(x))`` (Llama, Mistral, SmolLM) is refused with the gate named, and the
  script prints that refusal instead.

Without ``--model-dir`` a tiny model is built from a config (random weights, byte-level tokens):
that is what CI runs, in a few seconds. The text is this repository's README (no download).

    python examples/huggingface_pretrained.py                       # tiny Llama from a config
    python examples/huggingface_pretrained.py --arch gpt2           # tiny GPT-2 from a config
    python examples/huggingface_pretrained.py --model-dir ~/models/SmolLM-135M --epochs 2 --batches 20

What a third-party module needs (see README, "Adding lit_compress to your own project"): an
``example_input_array`` (here ``(1, block_size)`` token ids; the report measures FLOPs with it and
every event is checked on it before training goes on) and hyperparameters that rebuild the model
(``save_hyperparameters``: ``model_dir``/``arch``), so ``lit_compress.load_from_checkpoint`` can
replay the events on a fresh instance.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.callbacks import ALDS, CompressionReport, LayerCollapse, LayerFusion
from lit_compress.measure import count_parameters
from lit_compress.surgery.alds.allocate import target_layers
from lit_compress.surgery.chains import discover_mlps

ROOT = Path(__file__).resolve().parents[1]


def tiny_config_model(arch: str, vocab_size: int = 256) -> nn.Module:
    """A randomly initialised tiny Llama or GPT-2 built from its ``transformers`` config."""
    import transformers

    if arch == "llama":
        config: Any = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


class PretrainedCausalLM(L.LightningModule):
    """A ``transformers`` causal LM as a LightningModule: ``(B, T)`` token ids -> ``(B, T, V)`` logits.

    Args:
        model_dir: A local directory for ``AutoModelForCausalLM.from_pretrained``; ``None`` builds
            a tiny ``arch`` model from a config.
        arch: ``"llama"`` or ``"gpt2"`` (only without ``model_dir``).
        block_size: Tokens per training sample.
        lr: AdamW learning rate.
    """

    def __init__(self, model_dir: str | None = None, arch: str = "llama", block_size: int = 32, lr: float = 3e-4):
        super().__init__()
        self.save_hyperparameters()  # rebuilds the model in `lit_compress.load_from_checkpoint`
        if model_dir is None:
            self.lm = tiny_config_model(arch)
        else:
            from transformers import AutoModelForCausalLM

            self.lm = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        self.example_input_array = torch.zeros(1, block_size, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def token_ids(model_dir: str | None) -> torch.Tensor:
    """The README as token ids: the model's own tokenizer, or bytes for a tiny model."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if model_dir is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    from transformers import AutoTokenizer

    return torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"], dtype=torch.long)


def loaders(ids: torch.Tensor, block_size: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Non-overlapping ``(x, y)`` blocks (y = x shifted by one), the last 10 % held out."""
    n = (len(ids) - 1) // block_size
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1 : n * block_size + 1].view(n, block_size)
    cut = max(1, n // 10)
    train = DataLoader(TensorDataset(x[:-cut], y[:-cut]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[-cut:], y[-cut:]), batch_size=batch_size)
    return train, val


@torch.no_grad()
def perplexity(module: PretrainedCausalLM, loader: DataLoader, max_batches: int) -> float:
    """exp(mean next-token cross-entropy) over the first ``max_batches`` batches of ``loader``."""
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for (x, y), _ in zip(loader, range(max_batches), strict=False):
        total += float(module._loss((x.to(module.device), y.to(module.device)))) * x.numel()
        count += x.numel()
    module.train(was_training)
    return math.exp(total / max(count, 1))


def applicable_methods(module: PretrainedCausalLM, keep_ratio: float, fraction: float) -> list[L.Callback]:
    """The methods this model's structure supports, with disjoint ``targets`` (printed as it goes)."""
    methods: list[L.Callback] = []
    mlp_linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and ".mlp." in n]
    decomposable, _ = target_layers(module, mlp_linears)
    discovery = discover_mlps(module, module.example_input_array)
    if discovery.gated:
        print(f"LayerCollapse: not applied, {len(discovery.gated)} gated MLP(s): {discovery.gated[0].describe()}")
    if decomposable:
        print(f"ALDS: {len(decomposable)} MLP projection(s), keep_ratio={keep_ratio}")
        methods.append(ALDS(keep_ratio=keep_ratio, at_epoch=1, targets=["*.mlp.*"], num_seeds=3, progress=False))
    elif discovery.chains:
        print(f"LayerCollapse: {len(discovery.chains)} plain MLP chain(s)")
        methods.append(LayerCollapse(targets=["*.mlp.*"], warmup=1, lambda_final=1.0))
    print(f"LayerFusion: attention projections, fraction={fraction}")
    methods.append(LayerFusion(fraction=fraction, increments=1, at_epoch=1, targets=["*attn*"]))
    return methods


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=None, help="logs and the report (default: a temp dir)")
    parser.add_argument("--model-dir", default=None, help="a local from_pretrained directory")
    parser.add_argument("--arch", choices=["llama", "gpt2"], default="llama", help="tiny model without --model-dir")
    parser.add_argument("--epochs", type=int, default=2, help="epoch 0 trains, the events run at the start of 1")
    parser.add_argument("--batches", type=int, default=4, help="training batches per epoch")
    parser.add_argument("--val-batches", type=int, default=8, help="held-out batches for the perplexity")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-ratio", type=float, default=0.9, help="ALDS: fraction of all parameters kept")
    parser.add_argument("--fraction", type=float, default=0.05, help="Layer Fusion: fraction of parameters removed")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="hf_pretrained_"))
    module = PretrainedCausalLM(args.model_dir, args.arch, args.block_size)
    train, val = loaders(token_ids(args.model_dir), args.block_size, args.batch_size)
    methods = applicable_methods(module, args.keep_ratio, args.fraction)
    before = {"params": count_parameters(module), "ppl": perplexity(module, val, args.val_batches)}
    print(f"before: {before['params']:,} parameters, perplexity {before['ppl']:.2f}")

    trainer = L.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.batches,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*methods, CompressionReport(print_report=False)],
    )
    trainer.fit(module, train, val)
    after = {"params": count_parameters(module), "ppl": perplexity(module, val, args.val_batches)}
    ops = [event["op"] for event in getattr(module, "_lit_compress_events", [])]
    print(f"events: {', '.join(ops) or 'none'}")
    print(
        f"after:  {after['params']:,} parameters, perplexity {after['ppl']:.2f} ({args.batches} batches x "
        f"{args.epochs - 1} epoch(s) of fine-tuning after the events)"
    )
    return {
        "params_before": before["params"],
        "params_after": after["params"],
        "ppl_before": before["ppl"],
        "ppl_after": after["ppl"],
        "events": float(len(ops)),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
