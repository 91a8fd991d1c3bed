"""LayerMerge (Kim, El Halabi, Ji, Song, ICML 2024) on MNIST-5k, plus 224x224 latency of full-size structures.

Part 1, MNIST-5k (1,000 train / 4,000 test; SGD momentum 0.9, lr 0.05, wd 5e-4, batch 64, cosine):
for the CIFAR-style ResNet-20 and a small MobileNetV2 (torchvision MobileNetV2 blocks, stride-1 stem):

  (a) dense: pretrain ``E`` epochs, then ``F`` more epochs (the same budget as the merged ones),
      BN folded for timing (the "BN-fused original" of the paper);
  (b) LayerMerge-X% for X in 70/50/35: from the pretrained weights, build the latency table (this CPU,
      batch ``--latency-batch``) and the importance table (``--importance``: ``loss_proxy`` by
      default, or ``finetune`` with a few SGD steps per candidate), solve the DP, fine-tune the
      planned (unmerged) network ``F`` epochs, merge exactly, and test the *merged* network;
  (c) the half-width network of the same family trained from scratch for ``E + F`` epochs.

Latency: the whole model, eval mode, 2 threads, at batch 1, at the latency table's batch (16: the
batch the DP plans for) and at batch 64; the models of one net are timed together, interleaved, in
``--rounds`` rounds, each a median of ``--repeats`` calls, and a model's latency is its best round
(``benchmarks._common.interleaved_latency``).

Part 2, full-size structures (random weights: latency needs none): torchvision ResNet-34 and
MobileNetV2-1.0 at 224x224, batch 1 on this CPU. The latency table is measured for every entry
(150 / 391), the DP is solved with importance 1 per block (no trained weights: it then keeps as
many blocks as the budget allows; the paper's importance needs ImageNet fine-tunes), and the merged
network is timed against the BN-fused original.

    python -m benchmarks.layer_merge [--quick] [--seeds 0] [--out benchmarks/out]

Latency is measured with denormal floats flushed to zero (``measure_latency``'s default): fine-tuned
merged weights carried denormals that made the merged MobileNetV2 look slower than the original.

Run time: the defaults (6 + 4 epochs, budgets 70/50/35 %, both 224x224 structures) ran in 5.4
minutes on 2 free CPU cores (2026-11-24; ``wall_s`` in the output's config). Training runs on 1 thread;
latency is measured with 2. Rows are written to ``<out>/layer_merge.{json,md}`` as they finish; the
latency table is cached in ``<out>/layermerge_latency.json`` per device/batch context (delete it to
re-measure).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks._common import headline, time_rows, write_results
from lit_compress.measure import count_flops, count_parameters
from lit_compress.measure.latency_table import latency_table
from lit_compress.surgery import fold_batchnorm_
from lit_compress.surgery.chains import find_foldable_batchnorms
from lit_compress.surgery.layermerge.blocks import (
    analyze_merge_space,
    enumerate_candidates,
    original_latency,
    site_input_shapes,
)
from lit_compress.surgery.layermerge.dp import DPEntry, fastest_plan_time, solve_merge_dp
from lit_compress.surgery.layermerge.importance import importance_table
from lit_compress.surgery.layermerge.plan import apply_merge_plan_, merge_planned_

PAPER = {
    "resnet34": "paper (ImageNet, RTX 2080 Ti, b128): LayerMerge-71% 1.36x, -0.16 pts; -60% 1.56x; -50% 1.79x",
    "mobilenet_v2": "paper (ImageNet, RTX 2080 Ti, b128): LayerMerge-55% 1.63x, +0.10 pts; -46% 1.90x; -38% 2.18x",
}


def _loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, int]:
    x, y = batch
    out = model(x)
    return F.cross_entropy(out, y), int((out.argmax(1) == y).sum()), len(y)


def _train(model: nn.Module, loader: Any, epochs: int, lr: float = 0.05) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}], lr=lr, momentum=0.9
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    model.train()
    torch.set_num_threads(1)  # measured latency still uses 2 threads (measure_latency(num_threads=2))
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    torch.set_num_threads(2)


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Any) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def _fold_all(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """A copy with every foldable BN folded (the paper's BN-fused baseline), eval mode."""
    model = copy.deepcopy(model).eval()
    pairs = find_foldable_batchnorms(model, torch.zeros(1, *shape))
    if pairs:
        fold_batchnorm_(model, pairs)
    return model.eval()


def _stats(model: nn.Module, shape: tuple[int, ...], batches: tuple[int, ...]) -> dict[str, Any]:
    """Parameters, FLOPs, and empty speed-up/latency fields that :func:`_time_rows` fills in."""
    out: dict[str, Any] = {f"speedup_b{b}": None for b in batches}
    out.update(params=count_parameters(model), flops=int(count_flops(model, torch.zeros(1, *shape))))
    out.update({f"lat_b{b}_ms": None for b in batches})
    return out


def _time_rows(
    timed: list[tuple[dict[str, Any], nn.Module]],
    shape: tuple[int, ...],
    batches: tuple[int, ...],
    repeats: int,
    rounds: int,
) -> None:
    """Time the (folded) models of one net together, interleaved; the first is the reference (speed-up 1)."""
    time_rows(timed, torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)), batches, repeats, rounds)
    for row, _ in timed:
        row.update({f"speedup_b{b}": timed[0][0][f"lat_b{b}_ms"] / row[f"lat_b{b}_ms"] for b in batches})


def _tables(model: nn.Module, shape: tuple[int, ...], args: argparse.Namespace, loader: Any, uniform: bool = False):
    space = analyze_merge_space(model)
    site_input_shapes(model, space, torch.zeros(1, *shape))
    cands = enumerate_candidates(model, space)
    t0 = time.perf_counter()
    lat = latency_table(
        space,
        cands,
        batch_size=args.latency_batch if not uniform else 1,
        warmup=args.latency_warmup,
        repeats=args.latency_repeats,
        cache=args.cache,
        progress=False,
    )
    lat_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if uniform:
        imp = {c.key: 1.0 for c in cands}
    else:
        batches = []
        for i, b in enumerate(loader):
            if i >= args.importance_batches + args.holdout_batches:
                break
            batches.append(b)
        imp = importance_table(
            model,
            space,
            cands,
            train_batches=batches[: args.importance_batches],
            holdout_batches=batches[args.importance_batches :],
            forward_loss=_loss,
            method=args.importance,
            steps=args.importance_steps,
            progress=False,
        )
    imp_s = time.perf_counter() - t0
    return space, cands, lat, imp, lat_s, imp_s


def _plan(space: Any, cands: Any, lat: dict, imp: dict, budget: float) -> tuple[list, float, float, str]:
    """The DP's plan at ``budget``; an infeasible budget is raised to the fastest plan (and said so)."""
    total = original_latency(space, cands, lat)
    entries = [DPEntry(c.start, c.end, lat[c.key], imp[c.key], c) for c in cands]
    unit = total / 1000.0
    fastest = fastest_plan_time(entries, space.depth, unit) / total
    note = ""
    if fastest > budget:
        note = f"no plan meets {budget:.0%} of the table latency (fastest {fastest:.1%}): run at the fastest plan; "
        budget = fastest + 1e-6
    t0 = time.perf_counter()
    res = solve_merge_dp(entries, space.depth, budget * total, unit)
    dp_s = time.perf_counter() - t0
    return [[e.start, e.end, list(e.payload.kept)] for e in res.entries], res.time / total, dp_s, note


def _save(args: argparse.Namespace, rows: list[dict[str, Any]], start: float) -> None:
    """Write the table so far (a long run that is cut off keeps its finished rows)."""
    config = {k: v for k, v in vars(args).items() if k != "start"}
    config["wall_s"] = round(time.perf_counter() - start, 1)
    with contextlib.redirect_stdout(io.StringIO()):
        write_results("layer_merge", rows, config, args.out, headlines=merge_headlines(rows))


def part1(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    from lit_compress.data import MNIST5kDataModule
    from lit_compress.models.classifier import build_backbone

    dm = MNIST5kDataModule(train_size=1000, batch_size=64, seed=0)
    dm.setup("fit")
    shape = (1, 28, 28)
    for seed in args.seeds:
        for backbone in args.nets:
            torch.manual_seed(seed)
            train, test = dm.train_dataloader(), dm.test_dataloader()
            pre = build_backbone(backbone, 10, 1)
            t0 = time.perf_counter()
            _train(pre, train, args.epochs)
            pre_s = time.perf_counter() - t0
            pre_acc = _accuracy(pre, test)
            dense = copy.deepcopy(pre)
            _train(dense, train, args.finetune, lr=0.01)
            folded = _fold_all(dense, shape)
            timed = [
                (
                    dict(
                        part="mnist5k",
                        net=backbone,
                        seed=seed,
                        variant="dense (BN folded)",
                        acc=_accuracy(dense, test),
                        **_stats(folded, shape, args.batches),
                        note=f"pretrained {args.epochs} ep ({pre_acc:.2f} %, {pre_s:.0f} s) + {args.finetune} ep",
                    ),
                    folded,
                )
            ]
            space, cands, lat, imp, lat_s, imp_s = _tables(pre, shape, args, train)
            for budget in args.budgets:
                blocks, frac, dp_s, infeasible = _plan(space, cands, lat, imp, budget)
                model = copy.deepcopy(pre)
                rec = apply_merge_plan_(model, blocks)[0]
                _train(model, train, args.finetune, lr=0.01)
                acc_unmerged = _accuracy(model, test)
                merge_planned_(model, rec)
                folded = _fold_all(model, shape)
                timed.append(
                    (
                        dict(
                            part="mnist5k",
                            net=backbone,
                            seed=seed,
                            variant=f"LayerMerge-{round(budget * 100)}%",
                            acc=_accuracy(model, test),
                            **_stats(folded, shape, args.batches),
                            note=(
                                f"{infeasible}{len(blocks)}/{space.depth} blocks, table {frac:.0%}; "
                                f"unmerged acc {acc_unmerged:.2f}; tables {lat_s:.1f}+{imp_s:.1f} s "
                                f"({len(cands)} entries, {args.importance}), DP {dp_s * 1000:.0f} ms"
                            ),
                        ),
                        folded,
                    )
                )
            small = build_backbone(backbone, 10, 1, width_mult=0.5)
            _train(small, train, args.epochs + args.finetune)
            folded = _fold_all(small, shape)
            timed.append(
                (
                    dict(
                        part="mnist5k",
                        net=backbone,
                        seed=seed,
                        variant="half width, from scratch",
                        acc=_accuracy(small, test),
                        **_stats(folded, shape, args.batches),
                        note=f"{args.epochs + args.finetune} ep",
                    ),
                    folded,
                )
            )
            _time_rows(timed, shape, args.batches, args.repeats, args.rounds)
            rows.extend(row for row, _ in timed)
            _save(args, rows, args.start)
            for row, _ in timed:
                print(
                    {k: v for k, v in row.items() if k in ("net", "variant", "acc") or k.startswith("speedup")},
                    flush=True,
                )


def part2(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import torchvision

    size = args.full_size
    shape = (3, size, size)
    for name in args.full_nets:
        torch.manual_seed(0)
        net = torchvision.models.get_model(name, weights=None).eval()
        folded = _fold_all(net, shape)
        timed = [
            (
                dict(
                    part=f"{size}x{size}",
                    net=name,
                    seed=0,
                    variant="BN-fused original",
                    acc=None,
                    **_stats(folded, shape, (1,)),
                    note=PAPER.get(name, ""),
                ),
                folded,
            )
        ]
        space, cands, lat, imp, lat_s, _imp_s = _tables(net, shape, args, None, uniform=True)
        total = original_latency(space, cands, lat)
        for budget in args.budgets:
            blocks, frac, dp_s, infeasible = _plan(space, cands, lat, imp, budget)
            model = copy.deepcopy(net)
            rec = apply_merge_plan_(model, blocks)[0]
            merge_planned_(model.eval(), rec)
            folded = _fold_all(model, shape)
            timed.append(
                (
                    dict(
                        part=f"{size}x{size}",
                        net=name,
                        seed=0,
                        variant=f"LayerMerge-{round(budget * 100)}%",
                        acc=None,
                        **_stats(folded, shape, (1,)),
                        note=(
                            f"{infeasible}{len(blocks)}/{space.depth} blocks, table {frac:.0%} of {total:.0f} ms; "
                            "latency table "
                            f"{lat_s:.0f} s ({len(cands)} entries, b1), DP {dp_s * 1000:.0f} ms; importance 1/block"
                        ),
                    ),
                    folded,
                )
            )
        _time_rows(timed, shape, (1,), args.full_repeats, args.rounds)
        rows.extend(row for row, _ in timed)
        for row, _ in timed:
            print({k: v for k, v in row.items() if k in ("net", "variant") or k.startswith("speedup")}, flush=True)
        _save(args, rows, args.start)


def merge_headlines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per MNIST-5k net: the middle budget's merged model against the BN-fused dense one (seed 0)."""
    out = []
    for net in dict.fromkeys(r["net"] for r in rows if r["part"] == "mnist5k"):
        mine = [r for r in rows if r["part"] == "mnist5k" and r["net"] == net and r["seed"] == rows[0]["seed"]]
        dense = next(r for r in mine if r["variant"].startswith("dense"))
        merged = [r for r in mine if r["variant"].startswith("LayerMerge")]
        if not merged:
            continue
        pick = merged[len(merged) // 2]
        out.append(
            headline(
                "LayerMerge",
                f"MNIST-5k {net}",
                f"{pick['variant']} latency budget, merged",
                "test acc %",
                pick["acc"],
                dense["acc"],
                pick["params"],
                dense["params"],
                latency_b64_ms=pick["lat_b64_ms"],
                baseline_latency_b64_ms=dense["lat_b64_ms"],
                note=", ".join(f"{v:.2f}x at batch {k[9:]}" for k, v in pick.items() if k.startswith("speedup_b")),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--nets", nargs="+", default=["cifar_resnet20", "small_mobilenet_v2"])
    parser.add_argument("--epochs", type=int, default=6, help="pretraining epochs")
    parser.add_argument(
        "--finetune", type=int, default=4, help="fine-tuning epochs after the plan (the dense model gets them too)"
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    parser.add_argument("--importance", choices=["loss_proxy", "finetune"], default="loss_proxy")
    parser.add_argument("--importance-steps", type=int, default=10)
    parser.add_argument("--importance-batches", type=int, default=2)
    parser.add_argument("--holdout-batches", type=int, default=2)
    parser.add_argument("--latency-batch", type=int, default=16)
    parser.add_argument("--latency-warmup", type=int, default=2)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of whole models")
    parser.add_argument("--full-size", type=int, default=224)
    parser.add_argument("--full-nets", nargs="+", default=["resnet34", "mobilenet_v2"])
    parser.add_argument("--full-repeats", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved timing rounds; a model's latency is its best round"
    )
    parser.add_argument("--cache", default=None, help="latency cache JSON (default: <out>/layermerge_latency.json)")
    parser.add_argument("--parts", nargs="+", default=["mnist", "full"], choices=["mnist", "full"])
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.finetune, args.repeats, args.full_size, args.full_repeats, args.rounds = 1, 1, 3, 64, 2, 1
        args.full_nets = ["mobilenet_v2"]
        args.budgets = [0.5]
        args.nets = ["cifar_resnet20"]
    args.batches = tuple(sorted({1, args.latency_batch, 64}))  # the table's batch is the one the DP plans for
    args.cache = args.cache or f"{args.out}/layermerge_latency.json"
    torch.set_num_threads(2)
    start = time.perf_counter()
    args.start = start
    rows: list[dict[str, Any]] = []
    if "mnist" in args.parts:
        part1(args, rows)
    if "full" in args.parts:
        part2(args, rows)
    config = {k: v for k, v in vars(args).items() if k != "start"}
    config["wall_s"] = round(time.perf_counter() - start, 1)
    write_results("layer_merge", rows, config, args.out, headlines=merge_headlines(rows))
    print("\n".join(f"{PAPER[k]}  [paper's numbers]" for k in PAPER))


if __name__ == "__main__":
    main()
