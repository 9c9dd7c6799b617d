"""``anchor-lens plateau``: train every (strategy, seed), compare plateau lengths, report.

One [`UnitExperiment`][anchor_lens.runner.UnitExperiment] whose units are training runs,
``{"strategy": ..., "seed": ...}``: each is journaled when it finishes (and checkpointed
while it trains, ``OUT/checkpoints/``), so a killed comparison resumes, and under
``torchrun`` the runs are shared among the processes. ``finish`` writes

* ``curves.json`` — every run's logged curves (per-position accuracy, late accuracy, loss,
  weights- and context-component probes) and its plateau length;
* ``plateau.json`` — per strategy: plateau length mean ± sd over seeds (censored runs counted
  apart), final accuracy, the weights component's initial / lowest / final probe accuracy;
* ``accuracy.png``, ``weights_probe.png``, ``context_probe.png``, ``plateau_length.png``;
* ``report.md`` — which of the paper's claims hold on these runs, with the numbers.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import ClassVar

from ..report import Finding, findings_table, tally
from ..runner import (
    Context,
    OutputConfig,
    UnitExperiment,
    check_device,
    option,
    write_json,
)
from .curves import PlateauLength, summarize_lengths
from .model import PlateauModelConfig
from .tasks import FactorTask, LinearTask
from .train import STRATEGIES, TrainConfig, train

__all__ = [
    "Plateau",
    "PlateauConfig",
    "plateau_findings",
    "report_markdown",
    "summarize_strategies",
]


@dataclass
class PlateauConfig(OutputConfig):
    strategy: list[str] = option(
        ["all"],
        help="strategies to train and compare: baseline, warmup (D_fix first), mixed (a share "
        "of D_fix in every batch), aux (auxiliary loss on the weights component), or all",
        choices=[*STRATEGIES, "all"],
        nargs="+",
    )
    task: str = option(
        "factor",
        help="factor: the paper's factor task; linear: y = w·x with w drawn per sequence",
        choices=["factor", "linear"],
    )
    factors: int = option(3, help="F, factors per item (factor task)", positive=True)
    values: int = option(4, help="V, values per factor = classes (factor task)", positive=True)
    maps: int = option(1000, help="m, label maps (1 = the easy task D_fix)", positive=True)
    pairs: int = option(16, help="N, (item, label) pairs per sequence", positive=True)
    d_item: int = option(32, help="item vector size (factor task; dimension d of x for linear)")
    entangle: float = option(
        1.0,
        help="factor task: 0 = items are sums of value vectors (factors linearly readable), "
        "1 = each factor's signs flipped by the next factor's value (the model must learn to "
        "read them)",
    )
    task_seed: int = option(0, help="seed of the task's world: item embeddings, split, maps")
    layers: int = option(2, help="transformer blocks", positive=True)
    d_model: int = option(32, help="residual width", positive=True)
    heads: int = option(4, help="attention heads", positive=True)
    steps: int = option(2000, help="optimizer steps per run (warm-up included)", positive=True)
    batch_size: int = option(64, help="sequences per step", positive=True)
    lr: float = option(1e-3, help="Adam learning rate")
    warmup_steps: int = option(500, help="warmup: steps on D_fix before the target task")
    mix_fraction: float = option(0.25, help="mixed: share of every batch drawn from D_fix")
    aux_weight: float = option(0.1, help="aux: weight of the weights-component loss (paper: 0.1)")
    eval_every: int = option(100, help="steps between held-out evaluations", positive=True)
    eval_sequences: int = option(512, help="held-out sequences per evaluation", positive=True)
    probe_every: int = option(
        500, help="steps between probe fits, a multiple of --eval-every (0: never)"
    )
    probe_layer: int = option(-1, help="block whose output the probes read (-1: the last)")
    seed: list[int] = option([0, 1, 2, 3, 4], help="run seeds (model initialisation, data stream)")
    device: str = option(
        "cpu", help="torch device, e.g. cpu or cuda (under torchrun: cuda:LOCAL_RANK)"
    )
    threads: int = option(
        1,
        help="torch CPU threads per process; these models are small, so more threads mostly "
        "add synchronisation (run seeds in parallel with torchrun instead)",
        positive=True,
    )

    RUN_ONLY: ClassVar[tuple[str, ...]] = (*OutputConfig.RUN_ONLY, "device", "threads")

    def strategies(self) -> list[str]:
        names = list(STRATEGIES) if "all" in self.strategy else self.strategy
        return list(dict.fromkeys(names))  # in order, without repeats

    def build_task(self) -> FactorTask | LinearTask:
        if self.task == "linear":
            return LinearTask(d=self.d_item, n_pairs=self.pairs, seed=self.task_seed)
        return FactorTask(
            self.factors,
            self.values,
            self.maps,
            self.pairs,
            self.d_item,
            self.entangle,
            seed=self.task_seed,
        )

    def model_config(self) -> PlateauModelConfig:
        return PlateauModelConfig(self.layers, self.d_model, self.heads)

    def train_config(self, strategy: str, seed: int) -> TrainConfig:
        return TrainConfig(
            strategy=strategy,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            mix_fraction=self.mix_fraction,
            aux_weight=self.aux_weight,
            eval_every=self.eval_every,
            eval_sequences=self.eval_sequences,
            probe_every=self.probe_every,
            probe_layer=self.probe_layer,
            seed=seed,
            device=self.device,
            threads=self.threads,
        )


class Plateau(UnitExperiment):
    """Learning plateaus (Fu et al., ICML 2024): one training run per (strategy, seed)."""

    name = "plateau"
    config_cls = PlateauConfig
    unit_name = "run"

    def context(self, config: PlateauConfig, dist) -> Context:
        # Everything is checked here, before the first run: a bad option costs no training.
        check_device(config.device)
        config.build_task()
        config.model_config()
        for strategy in config.strategies():
            config.train_config(strategy, 0)
        return Context(config, None, None, dist=dist)

    def units(self, ctx: Context) -> list[dict]:
        cfg: PlateauConfig = ctx.config
        return [{"strategy": s, "seed": seed} for s in cfg.strategies() for seed in cfg.seed]

    def run_unit(self, ctx: Context, unit: dict) -> dict:
        cfg: PlateauConfig = ctx.config
        tag = f"{unit['strategy']}_seed{unit['seed']}"
        train_cfg = cfg.train_config(unit["strategy"], unit["seed"])
        if train_cfg.device == "cuda" and ctx.dist.world > 1:  # torchrun: one GPU per rank
            train_cfg = dataclasses.replace(train_cfg, device=f"cuda:{ctx.dist.local_rank}")
        result, _ = train(
            cfg.build_task(),
            train_cfg,
            cfg.model_config(),
            checkpoint=cfg.out / "checkpoints" / f"{tag}.pt",
            progress=not cfg.quiet,
            desc=tag,
        )
        return result.to_json()

    def finish(self, ctx: Context, records: list[dict]) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .plotting import plot_accuracy, plot_plateau_lengths, plot_probe

        cfg: PlateauConfig = ctx.config
        task = cfg.build_task()
        summary = summarize_strategies(records)
        setting = {
            "task": cfg.task,
            "knobs": {
                "factors": cfg.factors,
                "values": cfg.values,
                "maps": cfg.maps,
                "pairs": cfg.pairs,
            }
            if cfg.task == "factor"
            else {"d": cfg.d_item, "pairs": cfg.pairs},
            "model": {"layers": cfg.layers, "d_model": cfg.d_model, "heads": cfg.heads},
            "chance": task.chance,
            "plateau_definition": "first logged step where late-pair accuracy reaches chance + "
            "0.5 x (final - chance); final = mean of the last 3 evaluations; censored (null) "
            "when the final gain is below 0.1 x (1 - chance)",
        }
        write_json(cfg.out, "curves.json", {**setting, "runs": records})
        write_json(cfg.out, "plateau.json", {**setting, "strategies": summary})
        what = f"{cfg.task} task" + (
            f" F={cfg.factors} V={cfg.values} m={cfg.maps} N={cfg.pairs}"
            if cfg.task == "factor"
            else f" d={cfg.d_item} N={cfg.pairs}"
        )
        figures = {
            "accuracy.png": plot_accuracy(records, task.chance, title=what),
            "plateau_length.png": plot_plateau_lengths(summary, title=what),
        }
        if any(v is not None for r in records for v in r["weights_probe"]):
            figures["weights_probe.png"] = plot_probe(records, "weights_probe", title=what)
            figures["context_probe.png"] = plot_probe(records, "context_probe", title=what)
        for name, fig in figures.items():
            fig.savefig(cfg.out / name, dpi=110)
            plt.close(fig)
        findings = plateau_findings(summary, eval_every=cfg.eval_every)
        (cfg.out / "report.md").write_text(report_markdown(findings, summary, what, cfg))
        for strategy, s in summary.items():
            p = s["plateau"]
            if p["mean"] is None:
                length = f"not left in {s['total_steps']} steps (censored)"
            else:
                sd = "" if p["sd"] is None else f" ± {p['sd']:.0f}"
                length = f"{p['mean']:.0f}{sd} steps"
            print(
                f"{strategy:>8}: plateau {length} ({p['n_escaped']}/{p['n_runs']} escaped), "
                f"final late accuracy {s['final_late_mean']:.3f}"
            )
        print(f"-> {cfg.out / 'report.md'}")
        return summary


def _stat(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    mean = statistics.fmean(values) if values else None
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize_strategies(records: list[dict]) -> dict[str, dict]:
    """Per strategy: plateau length over seeds, final accuracy, weights-probe trajectory."""
    out: dict[str, dict] = {}
    for strategy in dict.fromkeys(r["strategy"] for r in records):
        runs = [r for r in records if r["strategy"] == strategy]
        lengths = [PlateauLength(**r["plateau"]) for r in runs]
        final, final_sd = _stat([r["late"][-1] for r in runs])
        probe = [[v for v in r["weights_probe"] if v is not None] for r in runs]
        points = max(map(len, probe))
        # A trajectory needs a probe after the first (step 0): with one point there is no
        # "lowest" or "final" to speak of (probe_every > steps), so they stay undefined.
        probe = [p for p in probe if len(p) > 1]
        init = _stat([p[0] for p in probe])[0] if probe else None
        low = _stat([min(p) for p in probe])[0] if probe else None
        last = _stat([p[-1] for p in probe])[0] if probe else None
        context = [[v for v in r["context_probe"] if v is not None] for r in runs]
        context = [c for c in context if c]
        out[strategy] = {
            "seeds": [r["seed"] for r in runs],
            "plateau": summarize_lengths(lengths),
            "total_steps": lengths[0].total_steps,
            "final_late_mean": final,
            "final_late_sd": final_sd,
            "weights_probe_points": points,
            "weights_probe_initial": init,
            "weights_probe_lowest": low,
            "weights_probe_final": last,
            "context_probe_final": _stat([c[-1] for c in context])[0] if context else None,
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
        }
    return out


def _bounded(s: dict) -> list[int]:
    # A censored run counts at the steps it ran: a lower bound on its plateau, so a strategy
    # with censored runs can only look *better* than it is when it is the baseline.
    return [v if v is not None else s["total_steps"] for v in s["plateau"]["lengths"]]


def _shorter(base: dict, other: dict) -> tuple[bool | None, str]:
    """Is ``other``'s plateau shorter than ``base``'s by more than 2 standard errors?"""
    a, b = _bounded(base), _bounded(other)
    if len(a) < 2 or len(b) < 2:
        return None, "needs at least two seeds per strategy"
    if not base["plateau"]["n_escaped"] and not other["plateau"]["n_escaped"]:
        return None, f"no run of either left the plateau in {base['total_steps']} steps"
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    t = diff / se if se > 0 else (math.inf if diff > 0 else 0.0)
    text = (
        f"{statistics.fmean(b):.0f} ± {statistics.stdev(b):.0f} vs baseline "
        f"{statistics.fmean(a):.0f} ± {statistics.stdev(a):.0f} steps "
        f"(difference {diff:.0f}, {t:.1f} standard errors; {len(b)} vs {len(a)} seeds)"
    )
    return bool(diff > 0 and t >= 2), text


def plateau_findings(summary: dict[str, dict], *, eval_every: int) -> list[Finding]:
    """The paper's claims (§4-5 of Fu et al.) checked on a plateau run's summary.

    A strategy "shortens the plateau" when its mean length is shorter than the baseline's by
    at least two standard errors (Welch), censored runs counted at their total steps.
    """
    out: list[Finding] = []
    base = summary.get("baseline")
    if base is None:
        return [Finding("The claims compare with the baseline.", None, "no baseline run")]
    p = base["plateau"]
    plateau = p["mean"] is not None and p["mean"] >= 5 * eval_every
    out.append(
        Finding(
            "Training on the hard task shows a plateau: late-pair accuracy stays near chance "
            f"for a while (here: a mean length of at least {5 * eval_every} steps) before rising.",
            plateau if p["n_escaped"] else None,
            f"baseline plateau {p['mean'] or 0:.0f} steps, {p['n_escaped']}/{p['n_runs']} runs "
            f"escaped; final late accuracy {base['final_late_mean']:.3f}"
            if p["n_escaped"]
            else f"no baseline run left the plateau in {base['total_steps']} steps",
        )
    )
    init, low = base["weights_probe_initial"], base["weights_probe_lowest"]
    no_trajectory = (
        "no weights-probe trajectory: probed at step 0 only (or not at all); use "
        "--probe-every at most --steps"
    )
    falls = "On the hard task the weights component falls below its initial value during training."
    if init is not None and low is not None:
        out.append(
            Finding(
                falls,
                low < init - 0.01,
                f"weights-probe accuracy: initial {init:.3f}, lowest {low:.3f}, final "
                f"{base['weights_probe_final']:.3f} (baseline, mean over seeds)",
            )
        )
    elif base["weights_probe_points"]:  # probed, but at step 0 only (none: no probe, linear)
        out.append(Finding(falls, None, no_trajectory))
    claims = {
        "warmup": "Warming up on the easy task D_fix shortens the plateau.",
        "mixed": "Mixing easy (D_fix) sequences into every batch shortens the plateau.",
        "aux": "An auxiliary loss on the weights component shortens the plateau.",
    }
    for strategy, claim in claims.items():
        if strategy in summary:
            out.append(Finding(claim, *_shorter(base, summary[strategy])))
    aux = summary.get("aux")
    strengthens = "The auxiliary loss strengthens the weights component."
    if aux and (aux["weights_probe_final"] is None or base["weights_probe_final"] is None):
        if aux["weights_probe_points"] or base["weights_probe_points"]:
            out.append(Finding(strengthens, None, no_trajectory))
    elif aux:
        out.append(
            Finding(
                strengthens,
                aux["weights_probe_final"] > base["weights_probe_final"],
                f"final weights-probe accuracy {aux['weights_probe_final']:.3f} (aux) vs "
                f"{base['weights_probe_final']:.3f} (baseline)",
            )
        )
    return out


def report_markdown(findings: list[Finding], summary: dict, what: str, cfg: PlateauConfig) -> str:
    """``report.md``: the claims table and the per-strategy numbers."""
    held, checked = tally(findings)
    score = "R²" if cfg.task == "linear" else "accuracy"
    lines = [
        f"# Learning plateaus: {what}",
        "",
        f"{cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads; {cfg.steps} steps of "
        f"{cfg.batch_size} sequences, Adam {cfg.lr}; seeds {', '.join(map(str, cfg.seed))}. "
        f"{held} of {checked} checkable claims of Fu et al. (ICML 2024) hold on these runs.",
        "",
        *findings_table(findings),
        "",
        f"| strategy | plateau length (steps) | escaped | final late {score} | weights probe "
        "initial / lowest / final | wall (s/run) |",
        "|---|---|---|---|---|---|",
    ]

    def num(x: float | None, fmt: str = ".3f") -> str:
        return "–" if x is None else format(x, fmt)

    for strategy, s in summary.items():
        p = s["plateau"]
        length = "censored" if p["mean"] is None else f"{p['mean']:.0f} ± {num(p['sd'], '.0f')}"
        lines.append(
            f"| {strategy} | {length} | {p['n_escaped']}/{p['n_runs']} | "
            f"{num(s['final_late_mean'])} ± {num(s['final_late_sd'])} | "
            f"{num(s['weights_probe_initial'])} / {num(s['weights_probe_lowest'])} / "
            f"{num(s['weights_probe_final'])} | {s['wall_s_mean']:.0f} |"
        )
    lines += [
        "",
        "Plateau length (our definition; the paper gives none): the first logged step at which "
        f"the held-out {score} on the second half of the pairs reaches chance + half of its "
        "final gain. A run whose final gain stays below a tenth of the possible one is censored "
        "(it never left the plateau); comparisons count it at its total steps. Warm-up steps "
        "count.",
    ]
    return "\n".join(lines) + "\n"
