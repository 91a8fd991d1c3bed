"""The benchmark protocol as code: converged start, equal recovery budget, baselines, seeds, timing.

Every method benchmark (``python -m benchmarks.<method>``) uses these functions, so that every row
of every table is produced the same way (``benchmarks/PROTOCOL.md`` says why):

- :func:`dense_start`: the dense model of a task, trained to its plateau once per seed (early stopping
  on the validation split), cached under ``<out>/cache/`` with a hash of its configuration;
- :func:`recover`: the same recovery budget for every compressed model and baseline (at the
  training learning rate, after a short linear re-warm), with the method's callbacks in the fit;
- :func:`scratch`: a network trained from scratch for a given budget (pretrain + recovery, or
  recovery only);
- :func:`magnitude_pruned` / uniform SVD (through ``ALDS(method="uniform")``): the classic baselines
  at a given parameter count;
- :func:`measure_rows`: the task metric, unique parameters, non-zero parameters, FLOPs, and CPU
  latency at batch 1 and 64, every model of a table timed interleaved with the run's own dense model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks import tasks
from benchmarks.tasks import ImageRecipe, Task, TextRecipe
from lit_compress.callbacks import CompressionReport, Distillation
from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.measure import count_flops, count_parameters, measure_latency

#: Threads for training; ``OMP_NUM_THREADS`` overrides it (1 when a run is split into processes side by side).
TRAIN_THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)
LATENCY_THREADS = 2
LATENCY_BATCHES = (1, 64)


# --------------------------------------------------------------------------------------------
# settings of one run
# --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What a benchmark run varies: seeds, the scale (``quick``), the output folder, the recipes."""

    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quick: bool = False
    image: ImageRecipe = field(default_factory=ImageRecipe)
    text: TextRecipe = field(default_factory=TextRecipe)
    latency_rounds: int = 5
    latency_repeats: int = 10
    limit_batches: int | None = None  # quick: a few batches per epoch
    skip_scratch: bool = False  # leave out every row trained from scratch (the costliest rows)
    method_only: bool = False  # only the method's own rows (with and without distillation), no comparison rows
    points: list[str] | None = None  # only these operating points (labels), for benchmarks that have several
    save_models: bool = False  # keep every timed model under <out>/models/ for a quiet re-timing (benchmarks.retime)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> Settings:
        """Settings from :func:`parse_args`'s result."""
        s = cls.from_args(args.out, args.seeds, args.quick, args.seed_list, args.skip_scratch)
        s.method_only = bool(getattr(args, "method_only", False))
        s.points = getattr(args, "points", None)
        s.save_models = bool(getattr(args, "save_models", False))
        s.skip_scratch = s.skip_scratch or s.method_only
        return s

    @classmethod
    def from_args(
        cls, out: str, seeds: int, quick: bool, seed_list: Sequence[int] | None = None, skip_scratch: bool = False
    ) -> Settings:
        """``seed_list`` (explicit seeds, e.g. one per process) overrides ``seeds`` (0..N-1)."""
        chosen = list(seed_list) if seed_list else list(range(seeds))
        s = cls(out=Path(out), seeds=chosen, quick=quick, skip_scratch=skip_scratch)
        if quick:  # smoke settings: every code path, minutes instead of hours; numbers mean nothing
            s.seeds = s.seeds[:1]
            s.image = ImageRecipe(pretrain_max_epochs=2, patience=1, recovery_epochs=1, warmup_epochs=0.5)
            s.text = TextRecipe(pretrain_max_steps=40, val_every=20, patience=1, recovery_steps=20, warmup_steps=5)
            s.latency_rounds, s.latency_repeats, s.limit_batches = 1, 2, 3
        return s

    def budget(self, task: Task) -> dict[str, Any]:
        """The recipe of ``task`` as plain data (printed beside every table)."""
        return asdict(self.image if task.name == "mnist" else self.text)


# --------------------------------------------------------------------------------------------
# data and models of a task
# --------------------------------------------------------------------------------------------

_SPLITS: dict[str, Any] = {}


def splits(task: Task, settings: Settings) -> dict[str, Dataset]:
    """The task's train / val / test datasets (built once per process)."""
    if task.name not in _SPLITS:
        if task.name == "mnist":
            _SPLITS[task.name] = tasks.mnist_splits()
        else:
            data, vocab = tasks.shakespeare_splits(settings.text)
            _SPLITS[task.name] = data
            task.config["vocab"] = vocab
    if task.name == "shakespeare" and "vocab" not in task.config:
        task.config["vocab"] = tasks.shakespeare_splits(settings.text)[1]
    return _SPLITS[task.name]


def build(task: Task, settings: Settings, width: float = 1.0, **arch: Any) -> L.LightningModule:
    """A fresh member of the task's model family; ``width`` scales channels (images) or ``d_model`` (text)."""
    if task.name == "mnist":
        return tasks.image_model(task, width, settings.image)
    splits(task, settings)
    d_model = int(arch.pop("d_model", round(128 * width / 4) * 4))
    return tasks.text_model(task.config["vocab"], d_model=d_model, recipe=settings.text, **arch)


def example(task: Task, settings: Settings) -> torch.Tensor:
    """One input of batch 1, as the model sees it."""
    x, _ = splits(task, settings)["test"][0]
    return x[None]


def score(task: Task, settings: Settings, model: nn.Module, split: str = "test") -> float:
    data = splits(task, settings)[split]
    return tasks.accuracy(model, data) if task.metric == "acc" else tasks.perplexity(model, data)


def loaders(task: Task, settings: Settings) -> tuple[DataLoader, DataLoader]:
    data = splits(task, settings)
    batch = tasks.BATCH if task.name == "mnist" else settings.text.batch_size
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    train = DataLoader(data["train"], batch_size=batch, shuffle=True, generator=gen)
    return train, DataLoader(data["val"], batch_size=256)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def trainer(
    task: Task,
    settings: Settings,
    callbacks: Sequence[Callback],
    *,
    epochs: int | None = None,
    steps: int | None = None,
) -> L.Trainer:
    """A CPU Trainer with the protocol's budget: ``epochs`` (images) or ``steps`` (text)."""
    torch.set_num_threads(TRAIN_THREADS)
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        callbacks=[
            *callbacks,
            CompressionReport(measure_flops=False, print_report=False, output_dir=str(settings.out / "reports")),
        ],
        default_root_dir=str(settings.out / "lightning"),
    )
    if settings.limit_batches is not None:
        options.update(limit_train_batches=settings.limit_batches, limit_val_batches=settings.limit_batches)
    if task.name == "mnist":
        options.update(max_epochs=epochs)
    else:
        options.update(
            max_steps=steps, max_epochs=-1, val_check_interval=settings.text.val_every, check_val_every_n_epoch=None
        )
    return L.Trainer(**options)


def _config_hash(task: Task, settings: Settings, seed: int, extra: dict[str, Any]) -> str:
    blob = json.dumps({"task": task.label, "seed": seed, "budget": settings.budget(task), **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class DenseStart:
    """The converged dense model of one seed and how it was obtained."""

    path: Path
    seed: int
    metric: float
    val_metric: float
    steps_trained: int  # optimizer steps until the stop (the pretraining budget the baselines are given)
    best_at: int  # epoch (images) or step (text) of the checkpoint kept
    wall_s: float
    cached: bool

    def load(self, task: Task, settings: Settings) -> L.LightningModule:
        model = build(task, settings)
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["state_dict"])
        return model


def dense_start(task: Task, settings: Settings, seed: int) -> DenseStart:
    """Train the dense model of ``task`` to its plateau (early stopping on validation), once per config and seed."""
    key = _config_hash(task, settings, seed, {"kind": "dense"})
    cache = settings.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    path, meta_path = cache / f"dense_{task.name}_{task.model}_s{seed}_{key}.ckpt", cache / f"dense_{key}.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return DenseStart(path=path, cached=True, **meta)
    L.seed_everything(seed, verbose=False)
    model = build(task, settings)
    train, val = loaders(task, settings)
    monitor = "val_loss"
    best = ModelCheckpoint(dirpath=str(cache / f"tmp_{key}"), monitor=monitor, mode="min", save_top_k=1)
    stop = EarlyStopping(monitor=monitor, mode="min", patience=_recipe(task, settings).patience)
    start = time.perf_counter()
    if task.name == "mnist":
        fit = trainer(task, settings, [best, stop], epochs=settings.image.pretrain_max_epochs)
    else:
        fit = trainer(task, settings, [best, stop], steps=settings.text.pretrain_max_steps)
    fit.fit(model, train, val)
    wall = time.perf_counter() - start
    state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    Path(best.best_model_path).replace(path)  # a whole Lightning checkpoint: a distillation teacher loads from it
    best_at = int(state["epoch"] if task.name == "mnist" else state["global_step"])
    meta = {
        "seed": seed,
        "metric": score(task, settings, model),
        "val_metric": score(task, settings, model, "val"),
        "steps_trained": int(fit.global_step),
        "best_at": best_at,
        "wall_s": round(wall, 1),
    }
    meta_path.write_text(json.dumps(meta))
    for f in (cache / f"tmp_{key}").glob("*"):
        f.unlink()
    return DenseStart(path=path, cached=False, **meta)


def _recipe(task: Task, settings: Settings) -> ImageRecipe | TextRecipe:
    return settings.image if task.name == "mnist" else settings.text


def recovery_budget(task: Task, settings: Settings) -> dict[str, int]:
    return (
        {"epochs": settings.image.recovery_epochs} if task.name == "mnist" else {"steps": settings.text.recovery_steps}
    )


def recover(
    task: Task,
    settings: Settings,
    model: L.LightningModule,
    seed: int,
    callbacks: Sequence[Callback] = (),
    budget: dict[str, int] | None = None,
) -> float:
    """Fit ``model`` for the recovery budget (or ``budget``) with ``callbacks``; return the wall time."""
    L.seed_everything(seed + 1000, verbose=False)
    train, val = loaders(task, settings)
    b = budget or recovery_budget(task, settings)
    start = time.perf_counter()
    fit = trainer(task, settings, list(callbacks), epochs=b.get("epochs"), steps=b.get("steps"))
    fit.fit(model.train(), train, val if task.name == "mnist" else None)
    return time.perf_counter() - start


def training_budget(task: Task, settings: Settings, dense: DenseStart, full: bool) -> dict[str, int]:
    """The recovery budget, plus (``full``) the steps the dense model was pretrained for, in the task's unit."""
    rb = recovery_budget(task, settings)
    if task.name == "mnist":
        per_epoch = math.ceil(len(splits(task, settings)["train"]) / tasks.BATCH)
        return {"epochs": rb["epochs"] + (math.ceil(dense.steps_trained / per_epoch) if full else 0)}
    return {"steps": rb["steps"] + (dense.steps_trained if full else 0)}


def scratch(
    task: Task, settings: Settings, model: L.LightningModule, seed: int, dense: DenseStart, full: bool, kd: bool
) -> float:
    """Train ``model`` from scratch: the recovery budget only, or (``full``) the dense model's pretraining too."""
    callbacks = [Distillation(teacher_checkpoint=str(dense.path))] if kd else []
    return recover(task, settings, model, seed, callbacks, training_budget(task, settings, dense, full))


# --------------------------------------------------------------------------------------------
# baselines at a parameter count
# --------------------------------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.dim() > 1]


def magnitude_pruned(model: nn.Module, keep_params: int) -> nn.Module:
    """Global L1 unstructured pruning of conv/linear weights so that ``keep_params`` parameters are non-zero.

    The masks stay during recovery (``torch.nn.utils.prune``); :func:`finalize_pruning` makes them permanent.
    """
    from torch.nn.utils import prune

    total = count_parameters(model)
    weights = prunable_weights(model)
    prunable = sum(m.weight.numel() for m, _ in weights)
    remove = min(prunable - len(weights), max(0, total - keep_params))
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=int(remove))
    return model


def finalize_pruning(model: nn.Module) -> nn.Module:
    from torch.nn.utils import prune

    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")
    return model


def nonzero(model: nn.Module) -> int:
    seen: set[int] = set()
    count = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            count += int((p != 0).sum())
    return count


# --------------------------------------------------------------------------------------------
# rows: metric, size, cost, latency
# --------------------------------------------------------------------------------------------


def row(
    task: Task, settings: Settings, method: str, variant: str, seed: int, model: nn.Module, wall_s: float, **extra: Any
) -> dict[str, Any]:
    """One table row (latency is added by :func:`measure_rows`)."""
    model = model.eval()
    flops = count_flops(model, example(task, settings))
    return {
        "task": task.label,
        "method": method,
        "variant": variant,
        "seed": seed,
        task.metric: round(score(task, settings, model), 4),
        "params": count_parameters(model),
        "nonzero": nonzero(model),
        "flops": int(flops),
        "wall_s": round(wall_s, 1),
        **extra,
    }


def deployed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The model as it would be deployed for inference: a copy in eval mode, every BatchNorm that follows a
    conv/linear folded into it (exact in eval mode), pruning masks made permanent. Every row is timed so."""
    from lit_compress.surgery import fold_batchnorm_

    copy_ = copy_model(model) if isinstance(model, L.LightningModule) else copy.deepcopy(model)
    finalize_pruning(copy_)
    copy_.eval()
    with contextlib.suppress(ConfigError, SurgeryError):  # nothing to fold, or untraceable: timed as it is
        fold_batchnorm_(copy_, example_inputs=x)
    return copy_


def measure_rows(
    task: Task, settings: Settings, timed: list[tuple[dict[str, Any], nn.Module]], dense: nn.Module
) -> None:
    """Time every model of ``timed`` interleaved with ``dense`` (best of rounds of medians) and add the latencies.

    Each row gets ``lat_b1_ms``/``lat_b64_ms``, their spread over rounds (``lat_b64_spread``: max/min
    of the round medians) and ``speedup_b64`` against the dense model timed in the same rounds; the
    load average before timing is recorded in the row.
    """
    x = example(task, settings)
    models = [deployed(dense, x)] + [deployed(m, x) for _, m in timed]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    columns = latency_columns(time_interleaved(models, x, settings.latency_rounds, settings.latency_repeats))
    for (r, _), cols in zip(timed, columns):
        r.update(cols, load_avg_1min=None if load is None else round(load, 2))
    if settings.save_models:
        save_timed_models(settings.out, task, timed, models, x)


def time_interleaved(
    models: Sequence[nn.Module], x: torch.Tensor, rounds: int, repeats: int
) -> list[list[dict[int, float]]]:
    """``result[i][round][batch]``: median ms of ``models[i]`` in each round, at every batch of the protocol."""
    result: list[list[dict[int, float]]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            lat = {}
            for b in LATENCY_BATCHES:
                stats = measure_latency(
                    model.eval(), x, batch_size=b, warmup=3, repeats=repeats, num_threads=LATENCY_THREADS
                )
                lat[b] = float(stats["median_ms"])
            result[i].append(lat)
    return result


def latency_columns(rounds: list[list[dict[int, float]]]) -> list[dict[str, Any]]:
    """The latency columns of ``models[1:]`` from :func:`time_interleaved` (``models[0]`` is the dense model)."""
    best = [{b: min(r[b] for r in rs) for b in LATENCY_BATCHES} for rs in rounds]
    out = []
    for i in range(1, len(rounds)):
        medians = [rr[64] for rr in rounds[i]]
        out.append(
            {
                "lat_b1_ms": round(best[i][1], 3),
                "lat_b64_ms": round(best[i][64], 3),
                "lat_b64_spread": round(max(medians) / min(medians), 3),
                "dense_lat_b64_ms": round(best[0][64], 3),
                "speedup_b1": round(best[0][1] / best[i][1], 3),
                "speedup_b64": round(best[0][64] / best[i][64], 3),
                "latency_threads": LATENCY_THREADS,
            }
        )
    return out


def save_timed_models(
    out: Path, task: Task, timed: list[tuple[dict[str, Any], nn.Module]], deployed_models: list[nn.Module], x: Any
) -> None:
    """Pickle the deployed models of one table (dense first) under ``<out>/models/``; each row names its files."""
    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for model in deployed_models:
        digest = hashlib.sha1(str(id(model)).encode() + str(time.time_ns()).encode()).hexdigest()[:12]
        name = f"{task.label.replace('/', '_')}_{digest}.pt"
        torch.save({"model": model, "example": x}, folder / name)
        names.append(name)
    for (r, _), name in zip(timed, names[1:]):
        r["model_file"], r["dense_model_file"] = name, names[0]


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from benchmarks._common import environment as env

    return env()


def write(name: str, settings: Settings, rows: list[dict[str, Any]], config: dict[str, Any]) -> Path:
    """Write ``<out>/<name>.json``: the rows of every seed, the machine, versions, seeds and config."""
    settings.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "env": environment(),
        "seeds": settings.seeds,
        "quick": settings.quick,
        "skip_scratch": settings.skip_scratch,
        "method_only": settings.method_only,
        "points": settings.points,
        "config": config,
        "rows": rows,
    }
    path = settings.out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"[{name}] wrote {path} ({len(rows)} rows)", flush=True)
    return path


def copy_model(model: L.LightningModule) -> L.LightningModule:
    """A deep copy without the Trainer reference."""
    trainer_ref = model.__dict__.get("_trainer")
    model.__dict__["_trainer"] = None
    try:
        return copy.deepcopy(model)
    finally:
        model.__dict__["_trainer"] = trainer_ref


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# the rows a method benchmark makes
# --------------------------------------------------------------------------------------------


def compressed(
    task: Task,
    settings: Settings,
    start: DenseStart,
    seed: int,
    method: str,
    variant: str,
    callbacks: Sequence[Callback],
    kd: bool = False,
    **extra: Any,
) -> tuple[dict[str, Any], L.LightningModule]:
    """The method's callbacks in one recovery fit from the converged start (with distillation if ``kd``)."""
    model = start.load(task, settings)
    wall = recover(task, settings, model, seed, [*callbacks, *([Distillation()] if kd else [])])
    label = f"{variant}{', distilled' if kd else ''}"
    return row(task, settings, method, label, seed, model, wall, distilled=kd, **extra), model


def magnitude_at(
    task: Task, settings: Settings, start: DenseStart, seed: int, params: int, label: str
) -> tuple[dict[str, Any], L.LightningModule]:
    """Global magnitude pruning to ``params`` non-zero parameters, then the recovery budget (masks kept)."""
    model = start.load(task, settings)
    magnitude_pruned(model, params)
    wall = recover(task, settings, model, seed)
    finalize_pruning(model)
    r = row(task, settings, "magnitude pruning", f"global L1 to {label}", seed, model, wall, target_params=params)
    return r, model


def own_architecture(
    task: Task, settings: Settings, compressed_model: nn.Module, skip_ops: Sequence[str] = ()
) -> L.LightningModule:
    """A fresh, re-initialised model with the compressed model's structure (its events replayed, but ``skip_ops``)."""
    from lit_compress.surgery import applied_events, replay_events_

    fresh = build(task, settings)
    events = [dict(e) for e in applied_events(compressed_model) if e.get("op") not in skip_ops]
    replay_events_(fresh, events)
    for m in fresh.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset) and m is not fresh:
            reset()
    return fresh


def parse_args(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The command line every method benchmark takes."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out", help="where the JSON rows and the cache go")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (each has its own converged start)")
    parser.add_argument("--quick", action="store_true", help="smoke settings: every code path in minutes")
    parser.add_argument("--tasks", nargs="*", default=None, help="only these task/model labels, e.g. mnist/vgg")
    add_run_options(parser)
    return parser.parse_args(argv)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark shares for splitting a run: explicit seeds, and leaving out from-scratch rows."""
    parser.add_argument(
        "--seed-list",
        nargs="+",
        type=int,
        default=None,
        help="exactly these seeds (overrides --seeds), e.g. one per process",
    )
    parser.add_argument(
        "--skip-scratch", action="store_true", help="leave out every row trained from scratch (recorded in the JSON)"
    )
    parser.add_argument(
        "--method-only",
        action="store_true",
        help="only the method's own rows, with and without distillation: no pruning/SVD/post-training/scratch rows",
    )
    parser.add_argument(
        "--points",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="only these operating points, by their exact label (ALDS, Layer Fusion; recorded in the JSON)",
    )
    parser.add_argument(
        "--save-models",
        action="store_true",
        help="keep every timed model under <out>/models/ so `python -m benchmarks.retime` can time them again",
    )


def chosen_points(settings: Settings, points: Sequence[tuple[str, Any]]) -> list[tuple[bool, str, Any]]:
    """``(is_main, label, options)`` of the operating points ``--points`` keeps (all when it was not given).

    The main point is the first of ``points`` (the one also run with distillation and from scratch),
    whether or not the others are kept; an unknown label is an error naming the known ones.
    """
    labels = [label for label, _ in points]
    if settings.points is not None:
        unknown = [p for p in settings.points if p not in labels]
        if unknown:
            raise SystemExit(f"--points {unknown}: unknown here; the points are {labels}")
    return [
        (i == 0, label, options)
        for i, (label, options) in enumerate(points)
        if settings.points is None or label in settings.points
    ]


def select(all_tasks: Sequence[Task], labels: Sequence[str] | None) -> list[Task]:
    """The tasks whose label is in ``labels`` (all when None); an unknown label is an error naming the known ones."""
    if labels is None:
        return list(all_tasks)
    known = {t.label: t for t in all_tasks}
    unknown = [x for x in labels if x not in known]
    if unknown:
        raise SystemExit(f"--tasks {' '.join(unknown)}: unknown here; this benchmark has {', '.join(known)}")
    return [known[x] for x in labels]
