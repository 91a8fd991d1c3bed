"""Layer Fusion (O'Neill, Ver Steeg, Galstyan) on the two scaled tasks of shared/BENCHMARKS.md.

Part 1, images: ResNet-20 (CIFAR-style, 1×28×28, 272,186 params; its stages hold 6, 5 and 5
same-shape 3×3 convs, so tying can remove up to 72 % of it) on MNIST-5k (1,000 train / 4,000
test). A dense network is pretrained for ``--epochs`` epochs (SGD lr 0.05, momentum 0.9, cosine,
batch 64); every compressed variant then gets the SAME retraining budget of ``--retrain``
epochs (SGD lr 0.01, cosine) from that network:

  (a) dense: the pretrained network retrained for the same budget (the unfused baseline);
  (b) Layer Fusion to fraction p ∈ {0.25, 0.5, 0.7} (CR 1.33 / 2 / 3.33 on unique storage) in K
      increments, one at the start of each retraining epoch 1..K (wasserstein similarity, mean policy,
      BatchNorm re-estimated after each step), then the remaining epochs;
  (c) global L1 magnitude pruning (Lightning's ``ModelPruning``, every conv/linear weight) removing,
      at the end of retraining epochs 0..K−1 (the same moments), exactly as many weights as fusion
      removed at each step, so both end at the same unique/non-zero parameter count;
  (d) Layer Fusion one-shot to p, BatchNorm re-estimated, NO retraining (the paper's "no retrain");
  (e) a thinner ResNet-20 (``width_mult`` matched to (b)'s unique parameters) trained from scratch
      for the whole budget (pretrain + retrain epochs, lr 0.05): the protocol's strongest baseline.

Part 2, text: a character-level transformer (CausalLanguageModel, 6 layers, width 96, 4 heads,
context 64) on Shakespeare, pretrained for ``--lm-steps`` steps (AdamW lr 2e-3, warm-up + cosine);
then ``--lm-retrain`` steps (lr 1e-3) for (a) dense and (b) Layer Fusion fused to 20 % of its size
(p = 0.8, 8 increments, wasserstein/mean, norms included; at 6 layers that ties nearly every block
into one, an ALBERT-like shared block); (c) a narrower 6-layer model with matched parameters
trained from scratch for the whole budget. Metric: validation perplexity on 256 windows.

    python -m benchmarks.layer_fusion [--quick] [--seeds 0 1] [--out benchmarks/out]

Run time: the default settings (1 image seed, 4 + 5 epochs, K = 3; LM 300 + 150 steps) ran in 7.7
minutes on 2 free CPU cores (2026-11-24: images 5.9 min, LM 1.8 min); ``--quick`` in about a minute.
Latencies: the models of a seed timed together, interleaved, best of 5 rounds. Use ``--seeds 0 1 2`` for error bars.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from benchmarks._common import accuracy, environment, headline, perplexity, time_rows, write_results
from lit_compress.callbacks import CompressionReport, LayerFusion
from lit_compress.data import MNIST5kDataModule, ShakespeareDataModule
from lit_compress.measure import count_flops, count_parameters
from lit_compress.models import CausalLanguageModel, ImageClassifier
from lit_compress.surgery import applied_events, fuse_layers_, fusion_units, plan_fusions
from lit_compress.surgery.bn_stats import reestimate_batchnorm_

FRACTIONS = (0.25, 0.5, 0.7)
MEASURE, POLICY = "wasserstein", "mean"

# --------------------------------------------------------------------------------------------- helpers


_WORK_DIR = tempfile.mkdtemp(prefix="lit_compress_bench_")  # trainer and compression-report files go here


def make_trainer(
    callbacks: list[Any], max_epochs: int = -1, max_steps: int = -1, limit: int | None = None
) -> L.Trainer:
    if any(isinstance(cb, LayerFusion) for cb in callbacks):
        callbacks = [*callbacks, CompressionReport(print_report=False, output_dir=_WORK_DIR)]
    return L.Trainer(
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
        limit_train_batches=limit,
        default_root_dir=_WORK_DIR,
    )


def fit(model: L.LightningModule, callbacks: list[Any], dm: Any, **kwargs: Any) -> float:
    model.train()  # Lightning 2.6 keeps the mode it is given: a model left in eval mode would train with frozen BN
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(callbacks, **kwargs).fit(model, datamodule=dm)
    return time.perf_counter() - t


def nonzero_params(model: nn.Module) -> int:
    """Non-zero elements, each stored tensor once (a pruned model keeps its shapes)."""
    seen: dict[int, torch.Tensor] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), p)
    return int(sum(int((p != 0).sum()) for p in seen.values()))


def cost(model: nn.Module, one: torch.Tensor) -> dict[str, Any]:
    model.eval()
    return {"params": count_parameters(model), "nonzero": nonzero_params(model), "flops": count_flops(model, one)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def fusion_removals(model: nn.Module) -> dict[int, int]:
    """Epoch (or step) of each fusion event -> parameters it removed."""
    out: dict[int, int] = {}
    for e in applied_events(model):
        if e["op"] == "fuse_layers":
            out[int(e["epoch"])] = out.get(int(e["epoch"]), 0) + int(e["removed_params"])
    return out


# --------------------------------------------------------------------------------------------- part 1


def resnet(width: float, lr: float) -> ImageClassifier:
    return ImageClassifier(
        backbone="cifar_resnet20",
        width_mult=width,
        optimizer="sgd",
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        scheduler="cosine",
    )


def matched_width(target: int) -> float:
    """The ``width_mult`` of ResNet-20 whose parameter count is closest to ``target``."""
    best = min((abs(count_parameters(resnet(w / 100, 0.05)) - target), w / 100) for w in range(20, 101, 2))
    return best[1]


def prune_params(model: ImageClassifier) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def image_part(
    seeds: list[int], epochs: int, retrain: int, increments: int, repeats: int, limit: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    dm = MNIST5kDataModule(train_size=1000, batch_size=64, seed=0)
    dm.setup("fit")
    test = dm.test_dataloader()
    if limit is not None:  # --quick: every 8th test batch only
        test = [batch for i, batch in enumerate(test) if i % 8 == 0]
    one = torch.zeros(1, 1, 28, 28)
    raw: list[dict[str, Any]] = []
    timed: list[tuple[dict[str, Any], nn.Module]] = []

    def record(
        variant: str, seed: int, model: nn.Module, wall: float, latency: bool = True, **extra: Any
    ) -> dict[str, Any]:
        row = {"variant": variant, "seed": seed, "acc": accuracy(model, test), "train_s": round(wall, 1)}
        row.update(cost(model, one))
        row.update(extra)
        raw.append(row)
        if latency and repeats:
            timed.append((row, model))
        print(
            f"  [{variant} seed {seed}] acc {row['acc']:.2f} params {row['params']} "
            f"nonzero {row['nonzero']} ({wall:.0f}s)",
            flush=True,
        )
        return row

    for seed in seeds:
        L.seed_everything(seed, verbose=False)
        pre = resnet(1.0, 0.05)
        wall_pre = fit(pre, [], dm, max_epochs=epochs, limit=limit)
        base = count_parameters(pre)
        print(f"  [pretrained seed {seed}] acc {accuracy(pre, test):.2f} ({wall_pre:.0f}s)", flush=True)

        def retrained(
            callbacks: list[Any], pre: ImageClassifier = pre, seed: int = seed
        ) -> tuple[ImageClassifier, float]:
            """A copy of this seed's pretrained model, retrained with ``callbacks``, and its fit time."""
            model = copy.deepcopy(pre)
            model.hparams.lr = 0.01
            L.seed_everything(seed + 100, verbose=False)
            return model, fit(model, callbacks, dm, max_epochs=retrain, limit=limit)

        dense, wall = retrained([])
        record("(a) dense, retrained", seed, dense, wall_pre + wall)
        for p in FRACTIONS:
            cr = f"p={p} (CR {1 / (1 - p):.2f})"
            fusion = LayerFusion(
                fraction=p, increments=increments, every_n_epochs=1, at_epoch=1, measure=MEASURE, policy=POLICY
            )
            fused, wall = retrained([fusion])
            fused_row = record(
                f"(b) Layer Fusion {cr}", seed, fused, wall_pre + wall, False, cr=base / count_parameters(fused)
            )

            removed = fusion_removals(fused)  # fusion at the START of epoch e  <->  pruning at the END of e - 1
            schedule = {e - 1: n for e, n in removed.items()}
            model = copy.deepcopy(pre)
            model.hparams.lr = 0.01
            pruning = ModelPruning(
                "l1_unstructured",
                parameters_to_prune=prune_params(model),
                use_global_unstructured=True,
                amount=lambda epoch, s=schedule: s.get(epoch, 0),
                use_lottery_ticket_hypothesis=False,
                make_pruning_permanent=True,
                verbose=0,
            )
            L.seed_everything(seed + 100, verbose=False)
            wall = fit(model, [pruning], dm, max_epochs=retrain, limit=limit)
            record(f"(c) global magnitude pruning, same count {cr}", seed, model, wall_pre + wall, False)

            oneshot = copy.deepcopy(pre)
            units = fusion_units(oneshot)
            plan = plan_fusions(oneshot, units, MEASURE, math.ceil(p * base), POLICY, seed=seed)
            fuse_layers_(oneshot, plan, POLICY)
            reestimate_batchnorm_(oneshot, dm.train_dataloader(), num_batches=16)
            record(f"(d) Layer Fusion one-shot, no retraining {cr}", seed, oneshot, 0.0, False)

            width = matched_width(fused_row["params"])
            L.seed_everything(seed, verbose=False)
            small = resnet(width, 0.05)
            wall = fit(small, [], dm, max_epochs=epochs + retrain, limit=limit)
            record(f"(e) ResNet-20 width {width:.2f} from scratch, matched to {cr}", seed, small, wall)
        if timed:
            time_rows(timed, torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)), (1, 64), repeats)
            timed.clear()

    rows = []
    for variant in dict.fromkeys(r["variant"] for r in raw):
        rs = [r for r in raw if r["variant"] == variant]
        rows.append(
            {
                "variant": variant,
                "test acc % (4,000)": mean_std([r["acc"] for r in rs]),
                "unique params": rs[0]["params"],
                "non-zero params": rs[0]["nonzero"],
                "CR (unique)": f"{base / rs[0]['params']:.2f}",
                "MFLOPs (b1)": rs[0]["flops"] / 1e6,
                "lat b1 ms": statistics.median(r["lat_b1_ms"] for r in rs) if "lat_b1_ms" in rs[0] else "= (a)",
                "lat b64 ms": statistics.median(r["lat_b64_ms"] for r in rs) if "lat_b64_ms" in rs[0] else "= (a)",
                "seeds": len(rs),
            }
        )
    return rows, raw


# --------------------------------------------------------------------------------------------- part 2


def lm(vocab: int, block: int, d_model: int, lr: float, warmup: int) -> CausalLanguageModel:
    return CausalLanguageModel(
        vocab_size=vocab, block_size=block, n_layer=6, n_head=4, d_model=d_model, lr=lr, warmup_steps=warmup
    )


def lm_part(
    steps: int, retrain: int, block: int = 64, d_model: int = 96
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    batch = 32
    dm = ShakespeareDataModule(
        block_size=block, batch_size=batch, samples_per_epoch=batch * (steps + retrain), val_samples=256, seed=0
    )
    dm.setup("fit")
    val = dm.val_dataloader()
    one = torch.zeros(1, block, dtype=torch.long)
    info: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []

    def record(variant: str, model: nn.Module, wall: float, **extra: Any) -> dict[str, Any]:
        c = cost(model, one)
        row = {"variant": variant, "val ppl": perplexity(model, val), "unique params": c["params"]}
        row.update(
            {"size vs dense": c["params"] / base, "MFLOPs (1×T)": c["flops"] / 1e6, "train s": round(wall, 1), **extra}
        )
        rows.append(row)
        print(f"  [LM {variant}] ppl {row['val ppl']:.3f} params {c['params']} ({wall:.0f}s)", flush=True)
        return row

    L.seed_everything(0, verbose=False)
    pre = lm(dm.vocab_size, block, d_model, 2e-3, max(1, steps // 10))
    base = count_parameters(pre)
    wall_pre = fit(pre, [], dm, max_epochs=1, max_steps=steps)
    info["pretrain_ppl"] = perplexity(pre, val)
    print(f"  [LM pretrained] ppl {info['pretrain_ppl']:.3f} ({wall_pre:.0f}s)", flush=True)

    def retrained(callbacks: list[Any]) -> tuple[CausalLanguageModel, float]:
        model = copy.deepcopy(pre)
        model.hparams.lr, model.hparams.warmup_steps = 1e-3, max(1, retrain // 20)
        L.seed_everything(1, verbose=False)
        return model, fit(model, callbacks, dm, max_epochs=1, max_steps=retrain)

    dense, wall = retrained([])
    record("(a) dense, retrained", dense, wall_pre + wall)
    k = 8
    fusion = LayerFusion(
        fraction=0.8,
        increments=k,
        every_n_steps=max(1, retrain // (k + 2)),
        at_step=1,
        measure=MEASURE,
        policy=POLICY,
        include_norms=True,
    )
    fused, wall = retrained([fusion])
    fused_row = record("(b) Layer Fusion to 20 % of the size (p=0.8)", fused, wall_pre + wall)
    info["fused_tie_groups"] = sorted(
        {f["a"][0].rsplit(".", 1)[-1] for e in applied_events(fused) if e["op"] == "fuse_layers" for f in e["fusions"]}
    )

    width = min(
        range(8, d_model + 1, 4),
        key=lambda d: abs(count_parameters(lm(dm.vocab_size, block, d, 1e-3, 1)) - fused_row["unique params"]),
    )
    L.seed_everything(0, verbose=False)
    small = lm(dm.vocab_size, block, width, 2e-3, max(1, (steps + retrain) // 10))
    wall = fit(small, [], dm, max_epochs=1, max_steps=steps + retrain)
    record(f"(c) 6-layer width {width} from scratch (matched params)", small, wall)
    return rows, info


PAPER_ROWS = [
    {
        "paper's result (spec §1.5, read from figures)": "CIFAR-10 ResNet, 70 % fused (CR 3.33), retrained",
        "baseline": "~93.5",
        "fusion": "~92.3 (wasserstein-mean)",
        "other": "svd-tune ~92.9",
    },
    {
        "paper's result (spec §1.5, read from figures)": "CIFAR-10 ResNet-ELU, 70 % fused",
        "baseline": "~94.4",
        "fusion": "~93.9 (wasserstein-mean)",
        "other": "global-prune ~91.3",
    },
    {
        "paper's result (spec §1.5, read from figures)": "CIFAR-10 Wide-ResNet, 70 % fused",
        "baseline": "~95.8",
        "fusion": "~95.6 (wasserstein-mean)",
        "other": "covariance-drop ~95.1",
    },
    {
        "paper's result (spec §1.5, read from figures)": "GPT-2 'wiki2' ppl, fuse_kl 10/20/30/50/70 %",
        "baseline": "~14.1",
        "fusion": "20.1/19.1/15.1/15.3/17.3",
        "other": "global_prune 30/70 %: 10.8/14.1",
    },
    {
        "paper's result (spec §1.5, read from figures)": "Abstract claims",
        "baseline": "–",
        "fusion": "CIFAR-10 within 2 points at CR 3.33; WikiText-2 within 5 ppl at 20 % of size",
        "other": "no plotted point at 80 % compression",
    },
]


def images(
    out: str,
    common: dict[str, Any],
    seeds: list[int],
    epochs: int,
    retrain: int,
    increments: int,
    repeats: int,
    limit: int | None,
) -> float:
    """Part 1 with its result files; returns its wall time."""
    start = time.perf_counter()
    print(f"Part 1: ResNet-20 on MNIST-5k, seeds {seeds}, {epochs} + {retrain} epochs, K={increments}", flush=True)
    img_rows, img_raw = image_part(seeds, epochs, retrain, increments, repeats, limit)
    t_img = time.perf_counter() - start
    img_cfg = {
        **common,
        "task": "MNIST-5k, 1,000 train / 4,000 test (split seed 0)",
        "model": "cifar_resnet20 (272,186 params)",
        "seeds": seeds,
        "pretrain_epochs": epochs,
        "retrain_epochs": retrain,
        "increments": increments,
        "fusion_schedule": f"start of retraining epochs 1..{increments}",
        "batch_size": 64,
        "limit_train_batches": limit,
        "optimizer": "SGD momentum 0.9, wd 5e-4 on weights, cosine; pretrain lr 0.05, retrain lr 0.01; "
        "from-scratch lr 0.05",
        "pruning": "ModelPruning l1_unstructured, global over conv/linear weights, same count per step as fusion, "
        "no LTH",
        "bn": "BatchNorm re-estimated on 20 batches after each fusion step (16 for one-shot)",
        "latency": f"best of 5 interleaved rounds, each the median of {repeats} after 3 warm-up, 2 threads, eval mode",
        "part_wall_time_s": round(t_img, 1),
        "per_seed": img_raw,
    }
    dense_acc = statistics.mean(r["acc"] for r in img_raw if r["variant"].startswith("(a)"))
    fused70 = [r for r in img_raw if r["variant"].startswith("(b)") and "p=0.7" in r["variant"]]
    prune70 = [r for r in img_raw if r["variant"].startswith("(c)") and "p=0.7" in r["variant"]]
    dense_row = next(r for r in img_raw if r["variant"].startswith("(a)"))
    heads = [
        headline(
            "Layer Fusion",
            "MNIST-5k ResNet-20",
            "70 % fused (CR 3.33), retrained",
            "test acc %",
            statistics.mean(r["acc"] for r in fused70),
            dense_acc,
            fused70[0]["params"],
            dense_row["params"],
            latency_b64_ms=dense_row.get("lat_b64_ms"),
            baseline_latency_b64_ms=dense_row.get("lat_b64_ms"),
            note="storage only: every layer still runs, so the latency is the dense network's",
        ),
        headline(
            "Layer Fusion",
            "MNIST-5k ResNet-20",
            "baseline: global magnitude pruning, same count",
            "test acc %",
            statistics.mean(r["acc"] for r in prune70),
            dense_acc,
            prune70[0]["nonzero"],
            dense_row["params"],
        ),
    ]
    write_results("layer_fusion_mnist5k", img_rows, img_cfg, out, headlines=heads)
    return t_img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke version")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="image seeds; default: 0")
    parser.add_argument("--epochs", type=int, default=None, help="image pretraining epochs; default 4 (quick 1)")
    parser.add_argument("--retrain", type=int, default=None, help="image retraining epochs; default 5 (quick 2)")
    parser.add_argument("--increments", type=int, default=None, help="fusion steps K (images); default 3 (quick 1)")
    parser.add_argument("--lm-steps", type=int, default=None, help="LM pretraining steps; default 300 (quick 20)")
    parser.add_argument("--lm-retrain", type=int, default=None, help="LM retraining steps; default 150 (quick 20)")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    q = args.quick
    seeds = args.seeds or [0]
    epochs, retrain = args.epochs or (1 if q else 4), args.retrain or (2 if q else 5)
    increments = args.increments or (1 if q else 3)
    lm_steps, lm_retrain = args.lm_steps or (20 if q else 300), args.lm_retrain or (20 if q else 150)
    limit = 4 if q else None
    repeats = 3 if q else 10
    start = time.perf_counter()
    common = {"quick": q, "threads": 2, "env": environment(), "measure": MEASURE, "policy": POLICY}
    t_img = 0.0
    if not args.skip_images:
        t_img = images(args.out, common, seeds, epochs, retrain, increments, repeats, limit)
    if not args.skip_lm:
        print(f"Part 2: transformer LM on Shakespeare, {lm_steps} + {lm_retrain} steps", flush=True)
        lm_rows, lm_info = lm_part(lm_steps, lm_retrain)
        lm_cfg = {
            **common,
            "task": "Shakespeare char-level, 90/10 split, val ppl on 256 windows of 64",
            "model": "CausalLanguageModel n_layer 6, d_model 96, n_head 4, block 64, GELU",
            "seed": 0,
            "pretrain_steps": lm_steps,
            "retrain_steps": lm_retrain,
            "batch_size": 32,
            "optimizer": "AdamW wd 0.1 on matrices; pretrain lr 2e-3 (10 % warm-up), retrain lr 1e-3 (5 % warm-up), "
            "cosine",
            "fusion": "p=0.8, 8 increments every retrain//10 steps from step 1, include_norms",
            "info": lm_info,
            "part_wall_time_s": round(time.perf_counter() - start - t_img, 1),
        }
        dense, fused = lm_rows[0], lm_rows[1]
        lm_heads = [
            headline(
                "Layer Fusion",
                "Shakespeare char transformer",
                "fused to 20 % of the size",
                "val ppl",
                fused["val ppl"],
                dense["val ppl"],
                fused["unique params"],
                dense["unique params"],
                higher_is_better=False,
            )
        ]
        write_results("layer_fusion_shakespeare", lm_rows, lm_cfg, args.out, headlines=lm_heads)
    write_results(
        "layer_fusion_paper",
        PAPER_ROWS,
        {"source": "shared/specs/layer_fusion_and_collapse.md §1.5 (the paper's numbers, not ours)"},
        args.out,
    )
    wall = time.perf_counter() - start
    print(f"Total wall time: {wall:.0f}s ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
