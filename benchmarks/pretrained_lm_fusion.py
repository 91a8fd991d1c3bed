"""Layer Fusion on a pretrained Hugging Face causal LM: perplexity before, right after one fusion step,
and after a fine-tune budget, with and without alignment, and the time of the step.

No pretrained weights can be downloaded here, so the "pretrained" model is one we train ourselves and
save with ``save_pretrained``: a Llama-family ``LlamaForCausalLM`` (gated MLPs, grouped projections,
RMSNorm, rotary positions) trained on the Shakespeare characters until its validation loss levels off.
It is then loaded back with ``from_pretrained``, exactly as a user would load a checkpoint from the hub
cache, and everything after that point is what a user does with their own pretrained model:

1. test perplexity of the loaded model;
2. one fusion step: ⌊p·n⌋ layers of every group of same-role, same-shape projections tied to their
   most similar partner (``budget="layers_per_group"``, Wasserstein measure, mean policy), timed;
   test perplexity right after it, without training;
3. the same fine-tune budget for every row (AdamW, constant learning rate), then test perplexity; the
   dense model fine-tuned for the same budget is the reference.

Rows: dense, fused, fused with alignment (weight matching of the FFN hidden units before averaging).

    python -m benchmarks.pretrained_lm_fusion [--p 0.5] [--finetune-steps 300] [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from benchmarks import tasks
from benchmarks._common import environment


class LogitsOnly(nn.Module):
    """``(B, T)`` ids -> ``(B, T, V)`` logits of a ``transformers`` causal LM."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, idx: Tensor) -> Tensor:
        return self.lm(input_ids=idx).logits


def llama_config(vocab: int, block: int) -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=block,
        tie_word_embeddings=False,
    )


def train(model: nn.Module, data: Dataset, steps: int, lr: float, seed: int, warmup: int = 0) -> float:
    """AdamW for ``steps`` batches of 32 windows (linear warm-up, then cosine to 10 % when ``warmup``,
    else constant); returns the wall time in seconds."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)

    def factor(step: int) -> float:
        if not warmup:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loader = iter(DataLoader(data, batch_size=32, generator=torch.Generator().manual_seed(seed)))
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(loader)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - start


def pretrained_dir(out: Path, splits: dict[str, Dataset], vocab: int, steps: int) -> Path:
    """Train the Llama once (cached by its config and budget) and ``save_pretrained`` it."""
    import transformers

    recipe = tasks.TextRecipe()
    config = llama_config(vocab, recipe.block)
    key = hashlib.sha256(f"{config.to_json_string()}|{steps}".encode()).hexdigest()[:12]
    path = out / f"pretrained_llama_{key}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config)
    wall = train(LogitsOnly(lm), splits["train"], steps, lr=3e-3, seed=0, warmup=100)
    lm.save_pretrained(path)
    (path / "pretraining.json").write_text(json.dumps({"steps": steps, "wall_s": round(wall, 1)}))
    return path


def fusion_step(model: nn.Module, p: float, align: bool) -> dict[str, Any]:
    """Tie ⌊p·n⌋ layers of every group at once; returns the step's time and what it removed."""
    from lit_compress.measure import count_parameters
    from lit_compress.surgery.fusion import candidate_groups, fuse_layers_, fusion_units, plan_group_fusions

    before = count_parameters(model)
    start = time.perf_counter()
    units = fusion_units(model)
    counts = {g: int(p * len(m)) for g, m in candidate_groups(units).items()}
    plan = plan_group_fusions(model, units, "wasserstein", counts, "mean")
    fuse_layers_(model, plan, "mean", align=align)
    step_s = time.perf_counter() - start
    return {"fusions": len(plan), "removed": before - count_parameters(model), "step_s": round(step_s, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out", help="cache of the pretrained model and the JSON")
    parser.add_argument("--p", type=float, default=0.5, help="share of the layers of each group fused")
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate (constant)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tune seeds 0..N-1")
    parser.add_argument("--quick", action="store_true", help="smoke settings (tiny budgets)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.seeds = 30, 5, 1
    import transformers

    from lit_compress.measure import count_parameters

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits, vocab = tasks.shakespeare_splits(tasks.TextRecipe())
    path = pretrained_dir(out, splits, vocab, args.pretrain_steps)
    rows: list[dict[str, Any]] = []
    loaded = LogitsOnly(transformers.LlamaForCausalLM.from_pretrained(path)).eval()
    dense_params = count_parameters(loaded)
    before = tasks.perplexity(loaded, splits["test"])
    for variant in ("dense", "fused", "fused, aligned"):
        for seed in range(args.seeds):
            model = copy.deepcopy(loaded)
            step: dict[str, Any] = {}
            if variant != "dense":
                step = fusion_step(model, args.p, align=variant.endswith("aligned"))
            right_after = tasks.perplexity(model, splits["test"])
            wall = train(model, splits["train"], args.finetune_steps, args.lr, seed)
            row = {
                "variant": variant,
                "seed": seed,
                "params": count_parameters(model),
                "ppl_pretrained": round(before, 3),
                "ppl_right_after": round(right_after, 3),
                "ppl_after_finetune": round(tasks.perplexity(model, splits["test"]), 3),
                "finetune_s": round(wall, 1),
                **step,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    payload = {
        "benchmark": "pretrained_lm_fusion",
        "environment": environment(),
        "config": {
            **vars(args),
            "dense_params": dense_params,
            "model": json.loads(llama_config(vocab, 64).to_json_string()),
        },
        "pretraining": json.loads((path / "pretraining.json").read_text()),
        "rows": rows,
    }
    (out / "pretrained_lm_fusion.json").write_text(json.dumps(payload, indent=1, default=str))
    print(summary(rows))


def summary(rows: list[dict[str, Any]]) -> str:
    """One line per variant: mean ± spread over seeds."""
    lines = ["variant | params | ppl right after | ppl after fine-tune (mean, min-max) | step s"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        after = [r["ppl_after_finetune"] for r in rs]
        lines.append(
            f"{variant} | {rs[0]['params']} | {rs[0]['ppl_right_after']:.3f} | "
            f"{sum(after) / len(after):.3f} ({min(after):.3f}-{max(after):.3f}) | {rs[0].get('step_s', '-')}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
