"""LayerCollapse (Zibakhsh Shabgahi, Shariff, Koushanfar) on the two scaled tasks of shared/BENCHMARKS.md.

Part 1, images: the VGG-style CNN (3-layer MLP classifier, 936,618 params) on MNIST-5k
(1,000 train / 4,000 test), every variant with the same training budget (SGD momentum 0.9,
lr 0.02, gradient-norm clip 2, cosine, weight decay 0, batch 64 = 16 steps/epoch):

  (a) dense baseline;
  (b) LayerCollapse on the classifier's two MLPs during training (λ ramped 0 → 5 over 2 epochs,
      τ 0.05, collapse checked at every epoch start and at fit end);
  (c) the dense baseline (a) collapsed after training, no regulariser, no fine-tuning
      (``collapse_post_training_``; its max |Δlogit| on 256 test images is reported);
  (d) the network with its classifier collapsed at initialisation (a single linear head), then
      trained with the same budget: "remove the activations, no LayerCollapse";
  (e) the half-width VGG (``width_mult=0.5``) trained from scratch: the protocol's strongest baseline.

Part 2, text: a small character-level transformer (CausalLanguageModel) on Shakespeare, trained
once with LayerCollapse on every FFN block (``fraction=1``, decoupled slope step under AdamW,
λ = 10, GELU → PReLU at a = 0.01) and once without; then the last k FFN blocks (k = 0..n, from the
output side) are collapsed post-training and validation perplexity and parameters are measured.

    python -m benchmarks.layer_collapse [--quick] [--seeds 0 1 2] [--out benchmarks/out]

The default settings (3 seeds, 15 epochs, 1,000 LM steps) took 7 minutes on 2 CPU cores
(measured: images 4.1 min, LM 2.7 min); ``--quick`` (1 seed, 2 epochs, 40 LM steps) takes under a minute.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn

from benchmarks._common import accuracy, environment, headline, perplexity, time_rows, write_results
from lit_compress.callbacks import LayerCollapse
from lit_compress.data import MNIST5kDataModule, ShakespeareDataModule
from lit_compress.measure import count_flops, count_parameters
from lit_compress.models import CausalLanguageModel, ImageClassifier
from lit_compress.surgery.chains import find_linear_chains
from lit_compress.surgery.collapse.mlp import collapse_post_training_, collapsible_activations

# --------------------------------------------------------------------------------------------- helpers


def make_trainer(
    callbacks: list[Any], max_epochs: int = -1, max_steps: int = -1, clip: float | None = None
) -> L.Trainer:
    return L.Trainer(
        gradient_clip_val=clip,
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def mlp_links(model: nn.Module) -> list[Any]:
    """Every ``Linear → act → Linear`` link of ``model`` in dataflow order (the last is nearest the output)."""
    return [link for chain in find_linear_chains(model, model.example_input_array) for link in chain.links()]


def cost(model: nn.Module, one: torch.Tensor) -> dict[str, Any]:
    model.eval()
    return {"params": count_parameters(model), "flops": count_flops(model, one)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# --------------------------------------------------------------------------------------------- part 1


#: SGD lr and gradient-norm clip of every image variant. At lr 0.05 without clipping, runs whose
#: classifier turns linear (LayerCollapse, the linear head) diverged to NaN in 4 of 6 measured runs.
IMG_LR, IMG_CLIP = 0.02, 2.0


def classifier(width: float) -> ImageClassifier:
    return ImageClassifier(
        backbone="vgg_cnn",
        width_mult=width,
        optimizer="sgd",
        lr=IMG_LR,
        momentum=0.9,
        weight_decay=0.0,
        scheduler="cosine",
    )


def image_part(seeds: list[int], epochs: int, repeats: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    dm = MNIST5kDataModule(train_size=1000, batch_size=64, seed=0)  # the protocol's fixed split
    dm.setup("fit")
    test = dm.test_dataloader()
    probe = next(iter(test))[0][:256]  # for collapse_post_training_'s output error
    one = torch.zeros(1, 1, 28, 28)
    raw: list[dict[str, Any]] = []
    timed: list[tuple[dict[str, Any], nn.Module]] = []

    def record(variant: str, seed: int, model: nn.Module, wall: float, **extra: Any) -> None:
        row = {"variant": variant, "seed": seed, "acc": accuracy(model, test), "train_s": wall}
        row.update(cost(model, one))
        row.update(extra)
        raw.append(row)
        timed.append((row, model))
        print(f"  [{variant} seed {seed}] acc {row['acc']:.2f} params {row['params']} ({wall:.0f}s)", flush=True)

    for seed in seeds:
        # (a) dense
        L.seed_everything(seed, verbose=False)
        dense = classifier(1.0)
        t = time.perf_counter()
        make_trainer([], max_epochs=epochs, clip=IMG_CLIP).fit(dense, datamodule=dm)
        record("(a) dense", seed, dense, time.perf_counter() - t)

        # (c) dense collapsed post-training, no regulariser, no fine-tuning
        post = copy.deepcopy(dense)
        _, err = collapse_post_training_(post, mlp_links(post), probe)
        record("(c) dense + post-training collapse (no LC, no FT)", seed, post, 0.0, max_abs_logit_err=err)

        # (b) LayerCollapse during training
        L.seed_everything(seed, verbose=False)
        lc_model = classifier(1.0)
        lc = LayerCollapse(lambda_start=0.0, lambda_final=5.0, warmup=2, tau=0.05, collapse_at="epoch_start")
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer([lc], max_epochs=epochs, clip=IMG_CLIP).fit(lc_model, datamodule=dm)
        wall = time.perf_counter() - t
        left = {n: float(a.slope) for n, a in collapsible_activations(lc_model)}
        record(
            "(b) LayerCollapse λ=5, τ=0.05",
            seed,
            lc_model,
            wall,
            collapsed=len(lc.collapsed),
            not_collapsed_slopes=left or None,
        )
        if left:  # some slope never reached τ: force the rest, for the record
            forced = copy.deepcopy(lc_model)
            _, err = collapse_post_training_(forced, mlp_links(forced), probe)
            record("(b') (b) + forced collapse of the rest", seed, forced, 0.0, max_abs_logit_err=err)

        # (d) classifier collapsed at init (one linear head), then trained
        L.seed_everything(seed, verbose=False)
        linear_head = classifier(1.0)
        collapse_post_training_(linear_head, mlp_links(linear_head), probe)
        linear_head.train()
        t = time.perf_counter()
        make_trainer([], max_epochs=epochs, clip=IMG_CLIP).fit(linear_head, datamodule=dm)
        record("(d) linear head from scratch", seed, linear_head, time.perf_counter() - t)

        # (e) half width from scratch
        L.seed_everything(seed, verbose=False)
        half = classifier(0.5)
        t = time.perf_counter()
        make_trainer([], max_epochs=epochs, clip=IMG_CLIP).fit(half, datamodule=dm)
        record("(e) half-width VGG from scratch", seed, half, time.perf_counter() - t)
        time_rows(timed, torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)), (1, 64), repeats)
        timed.clear()

    rows = []
    for variant in dict.fromkeys(r["variant"] for r in raw):
        rs = [r for r in raw if r["variant"] == variant]
        errs = [r["max_abs_logit_err"] for r in rs if "max_abs_logit_err" in r]
        rows.append(
            {
                "variant": variant,
                "test acc % (4,000)": mean_std([r["acc"] for r in rs]),
                "params": rs[0]["params"],
                "MFLOPs (b1)": rs[0]["flops"] / 1e6,
                "lat b1 ms": statistics.median(r["lat_b1_ms"] for r in rs),
                "lat b64 ms": statistics.median(r["lat_b64_ms"] for r in rs),
                "MLPs collapsed in training": ",".join(str(r["collapsed"]) for r in rs)
                if "collapsed" in rs[0]
                else None,
                "max |Δlogit| of collapse": f"{max(errs):.3g}" if errs else None,
                "seeds": len(rs),
            }
        )
    return rows, raw


# --------------------------------------------------------------------------------------------- part 2


def lm_part(
    steps: int, n_layer: int, d_model: int, block: int, lam: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    batch = 32
    dm = ShakespeareDataModule(
        block_size=block, batch_size=batch, samples_per_epoch=batch * steps, val_samples=256, seed=0
    )
    dm.setup("fit")
    val = dm.val_dataloader()
    one = torch.zeros(1, block, dtype=torch.long)
    models: dict[str, nn.Module] = {}
    info: dict[str, Any] = {}
    for name, regularise in (("LayerCollapse-regularised", True), ("unregularised", False)):
        L.seed_everything(0, verbose=False)
        model = CausalLanguageModel(
            vocab_size=dm.vocab_size,
            block_size=block,
            n_layer=n_layer,
            n_head=4,
            d_model=d_model,
            lr=1e-3,
            warmup_steps=steps // 10,
        )
        callbacks: list[Any] = []
        if regularise:
            # tau tiny: nothing collapses during training; the sweep below collapses the last k blocks.
            callbacks = [
                LayerCollapse(fraction=1.0, lambda_final=lam, tau=1e-6, collapse_at="fit_end", penalty="decoupled")
            ]
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(callbacks, max_epochs=1, max_steps=steps).fit(model, datamodule=dm)
        info[name] = {
            "train_s": time.perf_counter() - t,
            "slopes": {n: float(a.slope) for n, a in collapsible_activations(model)},
        }
        print(f"  [LM {name}] {info[name]['train_s']:.0f}s, slopes {info[name]['slopes']}", flush=True)
        models[name] = model
    rows = []
    for name, model in models.items():
        links = mlp_links(model)
        for k in range(len(links) + 1):
            m = copy.deepcopy(model)
            err = 0.0
            if k:
                _, err = collapse_post_training_(m, links[-k:], one)
            c = cost(m, one)
            rows.append(
                {
                    "model": name,
                    "FFN blocks collapsed (last k)": k,
                    "val ppl": perplexity(m, val),
                    "params": c["params"],
                    "MFLOPs (1×T)": c["flops"] / 1e6,
                    "max |Δlogit| on a zero window": f"{err:.3g}",
                }
            )
            print(f"  [LM {name} k={k}] ppl {rows[-1]['val ppl']:.3f} params {c['params']}", flush=True)
    return rows, info


def image_headlines(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def mean(variant: str, key: str) -> float:
        return statistics.mean(r[key] for r in raw if r["variant"].startswith(variant))

    dense, lc = "(a)", "(b)"
    return [
        headline(
            "LayerCollapse",
            "MNIST-5k VGG-style CNN",
            "classifier collapsed in training",
            "test acc %",
            mean(lc, "acc"),
            mean(dense, "acc"),
            int(mean(lc, "params")),
            int(mean(dense, "params")),
            latency_b64_ms=mean(lc, "lat_b64_ms"),
            baseline_latency_b64_ms=mean(dense, "lat_b64_ms"),
        ),
        headline(
            "LayerCollapse",
            "MNIST-5k VGG-style CNN",
            "baseline: half-width from scratch",
            "test acc %",
            mean("(e)", "acc"),
            mean(dense, "acc"),
            int(mean("(e)", "params")),
            int(mean(dense, "params")),
            latency_b64_ms=mean("(e)", "lat_b64_ms"),
            baseline_latency_b64_ms=mean(dense, "lat_b64_ms"),
        ),
    ]


def lm_headlines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    reg = [r for r in rows if r["model"] == "LayerCollapse-regularised"]
    dense = next(r for r in rows if r["model"] == "unregularised" and r["FFN blocks collapsed (last k)"] == 0)
    last = reg[-1]
    return [
        headline(
            "LayerCollapse",
            "Shakespeare char transformer",
            f"all {last['FFN blocks collapsed (last k)']} FFNs collapsed",
            "val ppl",
            last["val ppl"],
            dense["val ppl"],
            last["params"],
            dense["params"],
            higher_is_better=False,
            note="baseline: the same model trained without the regulariser",
        )
    ]


PAPER_ROWS = [
    {
        "paper's result (spec §2.6)": "VGG-11-bn (torchvision), whole classifier collapsed [arithmetic]",
        "metric": "–",
        "params": "132.86M → 34.31M (−74.2 %)",
    },
    {
        "paper's result (spec §2.6)": "VGG-19, own head, from scratch, classifier collapsed (τ 0.1, λ 0.5)",
        "metric": "top-1 67.65 → 67.16",
        "params": "126.90M → 45.12M",
    },
    {
        "paper's result (spec §2.6)": "VGG-11-bn (torchvision), λ 5, 20 ep, slopes only",
        "metric": "top-1 69.03 → 66.36 (a = 0.992 / 0.991, before collapse)",
        "params": "132.86M",
    },
    {
        "paper's result (spec §2.6)": "GPT-2 WikiText-103, block 11 collapsed",
        "metric": "ppl 18.87 → 19.47",
        "params": "124.44M → 120.31M",
    },
    {
        "paper's result (spec §2.6)": "GPT-2 WikiText-103, blocks 10–11 collapsed",
        "metric": "ppl 18.87 → 20.09",
        "params": "124.44M → 116.18M",
    },
    {
        "paper's result (spec §2.6)": "ViT-Ti progressive, 1..5 MLPs collapsed",
        "metric": "top-1 75.34 → 75.79, 75.34, 74.42, 73.13, 71.35",
        "params": "77.4 % left at 5",
    },
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke version")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="image epochs (16 steps each); default 15 (quick 2)")
    parser.add_argument("--lm-steps", type=int, default=None, help="LM training steps; default 1000 (quick 40)")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (2 if args.quick else 15)
    lm_steps = args.lm_steps or (40 if args.quick else 1000)
    repeats = 5 if args.quick else 20
    lm_cfg = {"n_layer": 4, "d_model": 128, "block": 64, "lam": 10.0}
    start = time.perf_counter()
    print(f"Part 1: VGG-style CNN on MNIST-5k, seeds {seeds}, {epochs} epochs", flush=True)
    img_rows, img_raw = image_part(seeds, epochs, repeats)
    t_img = time.perf_counter() - start
    print(f"Part 2: transformer LM on Shakespeare, {lm_steps} steps", flush=True)
    lm_rows, lm_info = lm_part(lm_steps, **lm_cfg)
    wall = time.perf_counter() - start
    common = {"quick": args.quick, "wall_time_s": round(wall, 1), "threads": 2, "env": environment()}
    write_results(
        "layer_collapse_mnist5k",
        img_rows,
        {
            **common,
            "task": "MNIST-5k, 1,000 train / 4,000 test (split seed 0)",
            "seeds": seeds,
            "epochs": epochs,
            "batch_size": 64,
            "steps_per_epoch": 16,
            "optimizer": f"SGD lr {IMG_LR} momentum 0.9, gradient-norm clip {IMG_CLIP}, cosine, "
            "weight_decay 0 (ImageClassifier never decays the slopes anyway)",
            "layer_collapse": "lambda 0 -> 5 over 2 epochs, tau 0.05, penalty in the gradient (SGD), "
            "collapse_at epoch_start",
            "latency": "the models of a seed timed together: best of 5 interleaved rounds, "
            f"each the median of {repeats} after 3 warm-up, 2 threads, eval mode",
            "part_wall_time_s": round(t_img, 1),
            "per_seed": img_raw,
        },
        args.out,
        headlines=image_headlines(img_raw),
    )
    write_results(
        "layer_collapse_shakespeare",
        lm_rows,
        {
            **common,
            "task": "Shakespeare char-level, 90/10 split, val ppl on 256 windows of 64",
            "model": f"CausalLanguageModel n_layer {lm_cfg['n_layer']}, d_model {lm_cfg['d_model']}, "
            f"n_head 4, block {lm_cfg['block']}, GELU",
            "steps": lm_steps,
            "batch_size": 32,
            "optimizer": "AdamW lr 1e-3, wd 0.1 (not on slopes), warm-up 10 % + cosine",
            "layer_collapse": f"fraction 1.0, lambda {lm_cfg['lam']}, decoupled slope step, GELU -> PReLU(0.01); "
            "collapse by the sweep",
            "seed": 0,
            "train": lm_info,
        },
        args.out,
        headlines=lm_headlines(lm_rows),
    )
    write_results(
        "layer_collapse_paper",
        PAPER_ROWS,
        {"source": "shared/specs/layer_fusion_and_collapse.md §2.6 (the paper's numbers, not ours)"},
        args.out,
    )
    print(f"Total wall time: {wall:.0f}s ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
