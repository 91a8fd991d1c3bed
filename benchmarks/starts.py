"""Train (or find in the cache) the converged dense start of every task family, for the seeds given.

Every benchmark calls :func:`benchmarks.protocol.dense_start` itself; this command only fills the
cache first, so that benchmarks run side by side (``run_all --jobs``) never train the same start twice.

    python -m benchmarks.starts --out benchmarks/out [--seed-list 0] [--tasks mnist/resnet20 ...] [--quick]
"""

from __future__ import annotations

from benchmarks import protocol as P
from benchmarks.baselines import FAMILIES


def main(argv: list[str] | None = None) -> None:
    args = P.parse_args(__doc__, argv)
    settings = P.Settings.from_namespace(args)
    for name in args.tasks or list(FAMILIES):
        if name not in FAMILIES:
            raise SystemExit(f"--tasks {name}: unknown; the families are {', '.join(FAMILIES)}")
        for seed in settings.seeds:
            start = P.dense_start(FAMILIES[name], settings, seed)
            print(f"[starts] {name} seed {seed}: {start.metric:.3f} after {start.steps_trained} steps "
                  f"(cached={start.cached})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
