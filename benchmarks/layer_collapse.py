"""LayerCollapse (Zibakhsh Shabgahi et al. 2023) under the benchmark protocol (``benchmarks/PROTOCOL.md``).

Tasks: MNIST-5k with the VGG-style CNN and its 3-layer MLP classifier (``mnist/vgg``), and the
Shakespeare character transformer (``shakespeare/transformer``, every FFN). For each seed, from the
converged dense model:

- LayerCollapse inside the recovery fit: the activations become slopes at its start, the penalty
  ramps up over the first part, an MLP collapses once its slope is within τ of 1; also with
  distillation from the dense model (the paper's optional 0.5·CE + 0.5·KL);
- the same MLPs collapsed after training without the regulariser (``collapse_post_training_``), then
  the recovery budget;
- global magnitude pruning to the same parameter count;
- the collapsed architecture (linear head / linear FFNs) trained from scratch with the pretraining +
  recovery budget.

    python -m benchmarks.layer_collapse [--quick] [--seeds 3] [--out benchmarks/out]
"""

from __future__ import annotations

from typing import Any

from torch import nn

from benchmarks import protocol as P
from benchmarks.tasks import Task
from lit_compress.callbacks import LayerCollapse

TASKS = (Task("mnist", "vgg", "acc"), Task("shakespeare", "transformer", "ppl"))


def collapse(task: Task, settings: P.Settings) -> LayerCollapse:
    if task.name == "mnist":  # SGD: the penalty goes into the slopes' gradients
        epochs = settings.image.recovery_epochs
        return LayerCollapse(lambda_final=5.0, warmup=max(1, epochs // 3), warmup_unit="epochs", tau=0.05)
    steps = settings.text.recovery_steps
    return LayerCollapse(
        lambda_final=10.0, warmup=max(1, steps // 3), warmup_unit="steps", tau=0.05, collapse_at="epoch_start"
    )


def post_training(task: Task, settings: P.Settings, start: P.DenseStart, seed: int) -> tuple[dict[str, Any], nn.Module]:
    """Every MLP collapsed at once after training, without the regulariser, then the recovery budget."""
    from lit_compress.surgery import collapse_post_training_, find_linear_chains

    model = start.load(task, settings)
    x = P.example(task, settings)
    links = [link for chain in find_linear_chains(model, x) for link in chain.links()]
    _, error = collapse_post_training_(model, links, x)
    after = P.score(task, settings, model)
    wall = P.recover(task, settings, model, seed)
    variant = "collapsed after training without the regulariser, then the recovery budget"
    return P.row(
        task, settings, "LayerCollapse", variant, seed, model, wall, right_after=after, max_abs_error=error
    ), model


def run(task: Task, settings: P.Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for seed in settings.seeds:
        start = P.dense_start(task, settings, seed)
        dense = start.load(task, settings)
        timed: list[tuple[dict[str, Any], nn.Module]] = []
        main_model = None
        for kd in (False, True):
            cb = collapse(task, settings)
            r, model = P.compressed(task, settings, start, seed, "LayerCollapse", "LayerCollapse", [cb], kd)
            r["collapsed"] = len(cb.collapsed)
            timed.append((r, model))
            main_model = main_model or model
        assert main_model is not None
        if settings.method_only:
            P.measure_rows(task, settings, timed, dense)
            rows += [r for r, _ in timed]
            continue
        timed.append(post_training(task, settings, start, seed))
        params = timed[0][0]["params"]
        timed.append(P.magnitude_at(task, settings, start, seed, params, "LayerCollapse params"))
        if not settings.skip_scratch:
            fresh = P.own_architecture(task, settings, main_model)
            wall = P.recover(task, settings, fresh, seed, budget=P.training_budget(task, settings, start, True))
            variant = "collapsed architecture from scratch, pretrain + recovery budget"
            timed.append((P.row(task, settings, "LayerCollapse", variant, seed, fresh, wall), fresh))
        P.measure_rows(task, settings, timed, dense)
        rows += [r for r, _ in timed]
    return rows


def main(argv: list[str] | None = None) -> None:
    args = P.parse_args(__doc__, argv)
    settings = P.Settings.from_namespace(args)
    clock = P.timer()
    tasks = P.select(TASKS, args.tasks)
    rows = [r for task in tasks for r in run(task, settings)]
    config = {"tasks": [t.label for t in tasks], "budgets": {t.label: settings.budget(t) for t in tasks}}
    P.write("layer_collapse", settings, rows, {**config, "wall_s": round(clock(), 1)})


if __name__ == "__main__":
    main()
