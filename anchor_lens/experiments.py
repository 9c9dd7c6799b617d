"""Every command's config and experiment, all run by
[`run_experiment`][anchor_lens.runner.run_experiment].

* [`Evaluate`][anchor_lens.experiments.Evaluate] — ICL accuracy (``anchor-lens evaluate``):
  one record per query with its label-restricted prediction.
* [`Analyze`][anchor_lens.experiments.Analyze] — §2 of Wang et al. (``anchor-lens analyze``):
  one record per query with its flows per layer (Eqs. 2–4), its loyalty under each isolation
  condition (§2.2) and its class attention per layer (§2.3); the results, figures and report
  are computed from the records.
* [`Reweight`][anchor_lens.experiments.Reweight], [`Compress`][anchor_lens.experiments.Compress]
  and [`Diagnose`][anchor_lens.experiments.Diagnose] — the applications (§3): they fit or
  cache one context, so their record is one seed.
* [`LongContext`][anchor_lens.experiments.LongContext] — LM-Infinite: one record for the NLL
  curves, one for the passkey test.

Records are plain JSON, so a run can be resumed, sharded and re-aggregated.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch

from . import analysis, report
from .episodes import Episode
from .hooks import resolve_layers
from .icl import predict
from .prompts import build_icl_batch
from .runner import (
    Context,
    Experiment,
    ModelConfig,
    RunConfig,
    UnitExperiment,
    option,
    write_json,
)

__all__ = [
    "Analyze",
    "AnalyzeConfig",
    "Compress",
    "CompressConfig",
    "Diagnose",
    "DiagnoseConfig",
    "DualForm",
    "DualFormConfig",
    "Evaluate",
    "EvaluateConfig",
    "LongContext",
    "LongContextConfig",
    "Reweight",
    "ReweightConfig",
]


def provenance(ctx: Context) -> dict:
    """What every results file records: model, task, and where the data came from."""
    return {
        "model": str(ctx.config.model),
        "task": ctx.task.name,
        "label_words": list(ctx.task.label_words),
        "data": str(ctx.config.data) if ctx.config.data else None,
        **ctx.pools.to_json(),
    }


def _batch(ctx: Context, episode: Episode, indices: Sequence[int], **kwargs):
    queries = [episode.queries[i] for i in indices]
    demos = [episode.demos_for(i) for i in indices]
    return build_icl_batch(ctx.model, ctx.task, demos, queries, **kwargs).to(ctx.model.cfg.device)


# ---------------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateConfig(RunConfig):
    shots: int = option(1, help="demonstrations per class (0 = zero-shot)")
    scoring: str = option(
        "first_token",
        help="score the first token of each label word (the paper) or the whole word",
        choices=["first_token", "full_word"],
    )
    prepend_bos: bool | None = option(
        None, help="start prompts with the BOS token (default: the model's native convention)"
    )


class Evaluate(Experiment):
    """ICL accuracy: one record per query (prediction, label, class probabilities, mass)."""

    name = "evaluate"
    config_cls: ClassVar[type] = EvaluateConfig

    def records(self, ctx, episode, indices):
        cfg: EvaluateConfig = ctx.config
        batch = _batch(
            ctx,
            episode,
            indices,
            prepend_bos=cfg.prepend_bos,
            check_label_collisions=cfg.scoring == "first_token",
        )
        pred = predict(ctx.model, batch, cfg.scoring)
        return [
            {
                "label": int(label),
                "prediction": int(p),
                "probs": probs.tolist(),
                "label_mass": float(mass),
            }
            for label, p, probs, mass in zip(
                pred.labels, pred.predicted, pred.label_probs, pred.label_mass, strict=True
            )
        ]

    def finish(self, ctx, records, episodes):
        cfg: EvaluateConfig = ctx.config
        n_classes = ctx.task.n_classes
        seeds = {}
        for seed, recs in records.items():
            preds = [r["prediction"] for r in recs]
            labels = [r["label"] for r in recs]
            seeds[str(seed)] = {
                "accuracy": statistics.fmean(p == y for p, y in zip(preds, labels, strict=True)),
                "label_mass": statistics.fmean(r["label_mass"] for r in recs),
                "predicted_counts": [preds.count(c) for c in range(n_classes)],
                "predictions": preds,
                "labels": labels,
            }
        accs = [s["accuracy"] for s in seeds.values()]
        counts = [sum(s["predicted_counts"][c] for s in seeds.values()) for c in range(n_classes)]
        metrics = {
            "accuracy": statistics.fmean(accs),
            "accuracy_std": statistics.pstdev(accs),
            "accuracy_min": min(accs),
            "accuracy_max": max(accs),
            "n": next(iter(episodes.values())).n,
            "n_seeds": len(accs),
            "label_mass": statistics.fmean(s["label_mass"] for s in seeds.values()),
            "predicted_counts": dict(zip(ctx.task.label_words, counts, strict=True)),
            **provenance(ctx),
            "shots": cfg.shots,
            "episode_mode": cfg.demo_mode,
            "scoring": cfg.scoring,
            "prepend_bos": cfg.prepend_bos,
            "seeds": seeds,
        }
        path = write_json(cfg.out, "metrics.json", metrics)
        spread = (
            f"± {metrics['accuracy_std']:.3f} sd over {len(accs)} seeds"
            if len(accs) > 1
            else "1 seed; pass several --seed for the spread"
        )
        predicted = ", ".join(f"{w} {c}" for w, c in metrics["predicted_counts"].items())
        print(
            f"{ctx.task.name}: {cfg.shots}-shot accuracy {metrics['accuracy']:.3f} ({spread}; "
            f"n={metrics['n']}, {cfg.demo_mode.replace('_', '-')} demonstrations), label mass "
            f"{metrics['label_mass']:.2f}, predicted {predicted} -> {path}"
        )
        return metrics


# ----------------------------------------------------------------------------------- analyze
@dataclass
class AnalyzeConfig(RunConfig):
    batch_size: int = option(4, help="prompts per forward pass", positive=True)
    shots: int = option(1, help="demonstrations per class", positive=True)
    k_layers: int = option(5, help="layers isolated at each end", positive=True)
    top_k: int = option(5, help="tokens compared by word loyalty", positive=True)
    loss_target: str = option(
        "gold",
        help="label whose loss the saliency differentiates",
        choices=["gold", "prediction"],
    )
    binary_score: str = option(
        "raw",
        help="AUCROC_l with two predicted classes: raw class attention (the paper's code) or "
        "its share of the attention to both classes",
        choices=["raw", "share"],
    )
    include_special: bool = option(
        False, help="count special tokens (e.g. a BOS) as words in S_wp/S_ww"
    )


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "undefined" if value is None else format(value, spec)


class Analyze(Experiment):
    """§2 of the paper per query: flows, isolation loyalty, class attention per layer."""

    name = "analyze"
    config_cls: ClassVar[type] = AnalyzeConfig

    def records(self, ctx, episode, indices):
        cfg: AnalyzeConfig = ctx.config
        model = ctx.model
        layers = resolve_layers(model, None)
        spans = analysis.isolation_spans(model.cfg.n_layers, cfg.k_layers)
        batch = _batch(ctx, episode, indices)
        # One forward + backward gives the flows, the unedited logits and the class attention,
        # and keeps what the last k blocks received: the two last-k isolation conditions then
        # run only those blocks (the first N-k compute nothing different).
        sal = analysis.saliency_pass(
            model,
            batch,
            layers,
            loss_target=cfg.loss_target,
            exclude_special=not cfg.include_special,
            n_classes=ctx.task.n_classes,
            capture_from=spans["last"][0],
        )
        flows, scores, pred = sal.flows, sal.class_attention, sal.predictions.cpu()
        generators = [analysis.example_generator(episode.seed, i) for i in indices]
        iso = analysis.batch_isolation(
            model,
            batch,
            spans,
            generators,
            top_k=cfg.top_k,
            reference=sal.logits,
            block_inputs=sal.block_inputs,
        )
        return [
            {
                "label": int(batch.labels[b]),
                "prediction": int(pred[b]),
                "flow": {k: flows[k][:, b].tolist() for k in ("S_wp", "S_pq", "S_ww")},
                "isolation": {k: [float(a[b]), float(j[b])] for k, (a, j) in iso.items()},
                "class_attention": scores[:, b].tolist(),
            }
            for b in range(len(indices))
        ]

    def finish(self, ctx, records, episodes):
        import matplotlib

        matplotlib.use("Agg")
        from . import plotting

        cfg: AnalyzeConfig = ctx.config
        every = [r for recs in records.values() for r in recs]
        flows = {k: torch.tensor([r["flow"][k] for r in every]).T for k in ("S_wp", "S_pq", "S_ww")}
        flow = analysis.flow_result(
            flows, loss_target=cfg.loss_target, exclude_special=not cfg.include_special
        )
        spans = analysis.isolation_spans(ctx.model.cfg.n_layers, cfg.k_layers)
        iso_examples = {
            k: (
                torch.tensor([r["isolation"][k][0] for r in every]),
                torch.tensor([r["isolation"][k][1] for r in every]),
            )
            for k in analysis.ISOLATION_CONDITIONS
        }
        iso = analysis.isolation_result(
            iso_examples, spans, k_layers=cfg.k_layers, top_k=cfg.top_k, seed=cfg.seed[0]
        )
        deep = _seed_averaged_deep(ctx, records, cfg.binary_score)

        out = cfg.out
        first = next(iter(episodes.values()))
        protocol = provenance(ctx) | first.to_json() | {"seeds": list(records)}
        for name, result in (("flow", flow), ("isolation", iso), ("deep", deep)):
            write_json(out, f"{name}.json", result.to_json() | {"protocol": protocol})
        title = f"{ctx.task.name} · {cfg.model}"
        for name, plot, result in (
            ("fig3_flow", plotting.plot_flow, flow),
            ("fig4_isolation", plotting.plot_isolation, iso),
            ("fig5_deep", plotting.plot_deep, deep),
        ):
            plot(result, title=title).savefig(out / f"{name}.png", dpi=150)
        findings = report.paper_findings(flow, iso, deep)
        predicted = ", ".join(f"{w} {c}" for w, c in deep.predicted_classes.items())
        fresh = "fresh for every query" if first.mode == "per_query" else "one set for all"
        extra = (
            f"Protocol: seed(s) {', '.join(map(str, records))}, {first.shots} demonstration(s) "
            f"per class, {fresh}; demonstrations from {ctx.pools.demo_source}. Predicted "
            f"classes: {predicted}." + (f" AUCROC_l: {deep.note}." if deep.note else "")
        )
        (out / "report.md").write_text(
            report.findings_markdown(
                findings, model=str(cfg.model), task=ctx.task.name, n=flow.n, extra=extra
            )
        )
        held, checked = report.tally(findings)
        c = iso.conditions
        peak = max((a for a in deep.aucroc if a is not None), default=None)
        print(
            f"{ctx.task.name}: {held}/{checked} checkable paper findings hold (n={flow.n}, "
            f"{len(findings) - checked} undefined); label loyalty first/last {cfg.k_layers} "
            f"layers {c['label_first']['label_loyalty']:.2f}/"
            f"{c['label_last']['label_loyalty']:.2f}; peak AUCROC_l {_fmt(peak)} "
            f"-> {out / 'report.md'}"
        )
        return {"flow": flow, "isolation": iso, "deep": deep, "findings": findings}


def _seed_averaged_deep(ctx: Context, records: dict[int, list[dict]], binary_score: str):
    """AUCROC_l per seed, averaged over the seeds where it is defined (the paper: mean of 5
    seeds, R_l on the mean); one seed gives that seed's result."""
    from . import metrics

    per_seed = []
    for recs in records.values():
        scores = torch.tensor([r["class_attention"] for r in recs]).transpose(0, 1)
        preds = torch.tensor([r["prediction"] for r in recs])
        per_seed.append(analysis.deep_result(scores, preds, ctx.task, binary_score))
    if len(per_seed) == 1:
        return per_seed[0]
    defined = [d for d in per_seed if d.defined]
    counts = {w: sum(d.predicted_classes[w] for d in per_seed) for w in ctx.task.label_words}
    n = sum(d.n for d in per_seed)
    if not defined:
        reasons = "; ".join(d.undefined_reason or "" for d in per_seed)
        return analysis.DeepResult(
            [None] * len(per_seed[0].aucroc), [None] * len(per_seed[0].aucroc), n, counts,
            binary_score, f"undefined in every seed ({reasons})",
        )  # fmt: skip
    mean = [statistics.fmean(layer) for layer in zip(*(d.aucroc for d in defined), strict=True)]
    note = f"mean over the {len(defined)} of {len(per_seed)} seeds where AUCROC_l is defined"
    return analysis.DeepResult(mean, metrics.cumulative_r(mean), n, counts, binary_score, note=note)


# ------------------------------------------------------------------------------ applications
# Re-weighting and compression train or cache one context, so their unit is a seed (one
# demonstration set), not a query: seeds are journaled, resumed and sharded across processes.
def _seed_units(ctx: Context) -> list[dict]:
    return [{"seed": seed} for seed in ctx.config.seed]


@dataclass
class ReweightConfig(RunConfig):
    demo_mode: str = field(default="fixed")  # β belongs to one context: not an option
    train_per_class: int = option(4, help="β training examples per class", positive=True)
    epochs: int = option(10, help="passes over the training set", positive=True)
    lr: float = option(0.01, help="Adam learning rate for β")


class Reweight(UnitExperiment):
    """Anchor re-weighting vs vanilla 1-shot and 5-shot ICL (Table 1), one unit per seed.

    Each seed's β is saved as ``OUT/beta_seed{S}.safetensors`` when its unit finishes.
    """

    name = "reweight"
    config_cls = ReweightConfig
    unit_name = "seed"
    units = staticmethod(_seed_units)

    def run_unit(self, ctx, unit):
        from .reweighting import run_reweighting

        config = ctx.config
        result, module = run_reweighting(
            ctx.model,
            ctx.task,
            pools=ctx.pools,
            n=config.n,
            seed=unit["seed"],
            train_per_class=config.train_per_class,
            epochs=config.epochs,
            lr=config.lr,
            batch_size=config.batch_size,
            progress=not config.quiet,
        )
        config.out.mkdir(parents=True, exist_ok=True)
        module.save(config.out / f"beta_seed{unit['seed']}.safetensors")
        return result.to_json()

    def finish(self, ctx, records):
        keys = ("accuracy_1shot", "accuracy_5shot", "accuracy_reweighted")
        summary = {key: statistics.fmean(r[key] for r in records) for key in keys}
        summary.update(n=records[0]["n"], **provenance(ctx), seeds=records)
        path = write_json(ctx.config.out, "reweight.json", summary)
        print(
            f"{ctx.task.name}: accuracy 1-shot {summary['accuracy_1shot']:.3f}, 5-shot "
            f"{summary['accuracy_5shot']:.3f}, re-weighted {summary['accuracy_reweighted']:.3f} "
            f"(n={summary['n']}, {len(records)} seed(s)) -> {path}"
        )
        return summary


@dataclass
class CompressConfig(RunConfig):
    demo_mode: str = field(default="fixed")  # the compressed cache is one context
    n_random: int = option(20, help="Hidden_random draws", positive=True)
    top_k: int = option(5, help="tokens for word loyalty", positive=True)


class Compress(UnitExperiment):
    """Anchor-only compression vs full ICL and baselines (Tables 2-3), one unit per seed."""

    name = "compress"
    config_cls = CompressConfig
    unit_name = "seed"
    units = staticmethod(_seed_units)

    def run_unit(self, ctx, unit):
        from .compression import run_compression

        config = ctx.config
        return run_compression(
            ctx.model,
            ctx.task,
            pools=ctx.pools,
            n=config.n,
            seed=unit["seed"],
            n_random=config.n_random,
            top_k=config.top_k,
            batch_size=config.batch_size,
        ).to_json()

    def finish(self, ctx, records):
        methods = {
            name: {
                key: statistics.fmean(r["methods"][name][key] for r in records)
                for key in records[0]["methods"][name]
            }
            for name in records[0]["methods"]
        }
        summary = {
            "methods": methods,
            "speedup": statistics.fmean(r["speedup"] for r in records),
            "n": records[0]["n"],
            **provenance(ctx),
            "seeds": records,
        }
        path = write_json(ctx.config.out, "compress.json", summary)
        a = methods["hidden_anchor"]
        print(
            f"{ctx.task.name}: Hidden_anchor label loyalty {a['label_loyalty']:.2f}, word "
            f"loyalty {a['word_loyalty']:.2f}, accuracy {a['accuracy']:.3f} (full ICL "
            f"{methods['full_icl']['accuracy']:.3f}), {summary['speedup']:.2f}x faster -> {path}"
        )
        return summary


@dataclass
class DiagnoseConfig(RunConfig):
    layer: int | None = option(None, help="layer (default: 3/4 of depth)")
    components: int = option(10, help="PCA components", positive=True)


class Diagnose(UnitExperiment):
    """Anchor-distance error diagnosis (Fig. 6): one seed, one unit."""

    name = "diagnose"
    config_cls = DiagnoseConfig
    unit_name = "seed"
    units = staticmethod(_seed_units)

    def context(self, config, dist):
        if len(config.seed) != 1:
            raise ValueError("diagnose takes one --seed; run it once per seed.")
        return super().context(config, dist)

    def run_unit(self, ctx, unit):
        from .diagnosis import run_diagnosis

        config = ctx.config
        result = run_diagnosis(
            ctx.model,
            ctx.task,
            pools=ctx.pools,
            n=config.n,
            seed=unit["seed"],
            mode=config.demo_mode,
            layer=config.layer,
            n_components=config.components,
            batch_size=config.batch_size,
            progress=not config.quiet,
        )
        return result.to_json() | {
            "most_confused_predicted": result.most_confused("predicted"),
            "most_confused_real": result.most_confused("real"),
        }

    def finish(self, ctx, records):
        import matplotlib

        matplotlib.use("Agg")
        from .diagnosis import DiagnosisResult
        from .plotting import plot_confusion

        config = ctx.config
        record = dict(records[0])
        record.pop("seed")
        out = record | provenance(ctx)
        path = write_json(config.out, "diagnose.json", out)
        result = DiagnosisResult(**{f.name: record[f.name] for f in fields(DiagnosisResult)})
        plot_confusion(result, title=f"{ctx.task.name} · {config.model}").savefig(
            config.out / "confusion.png", dpi=150
        )
        print(
            f"{ctx.task.name}: most confused predicted "
            f"{'-'.join(out['most_confused_predicted'])}, real "
            f"{'-'.join(out['most_confused_real'])}; Spearman ρ {_fmt(result.spearman)} "
            f"(layer {result.layer}, n={result.n}) -> {path}"
        )
        return out


# ------------------------------------------------------------------------------ LM-Infinite
@dataclass
class LongContextConfig(ModelConfig):
    text: Path | None = option(
        None, help="a plain-text file of long text (default: the texts of --task/--data joined)"
    )
    task: str = option("agnews", help="task whose texts to join")
    data: str | None = option(None, help="file or folder for --task (default: its hub test split)")
    length: int | None = option(None, help="NLL window in tokens (default: 1.5 x L)")
    n_windows: int = option(1, help="disjoint windows to average", positive=True)
    bin_size: int = option(256, help="positions per NLL bin", positive=True)
    passkey_lengths: list[int] | None = option(
        None, help="passkey prompt lengths (default: L/2 and 1.25 x L; none to skip)", nargs="*"
    )
    passkey_trials: int = option(3, help="key depths per length", positive=True)
    n_global: int = option(10, help="global tokens")
    seed: int = option(0, help="seed for the passkeys")


class LongContext(UnitExperiment):
    """LM-Infinite: NLL per position and passkey retrieval past the pre-training length.

    Two units, the NLL curves and the passkey test, so a killed run keeps the finished one.
    """

    name = "long-context"
    config_cls = LongContextConfig
    unit_name = "part"

    def context(self, config, dist):
        if config.text is not None and not config.text.is_file():
            raise FileNotFoundError(f"--text: no such file {config.text}")
        return super().context(config, dist)

    def _limit(self, ctx) -> int:
        from .lminfinite import pretrain_length

        return pretrain_length(ctx.model)  # the config's L: no need for the plain twin

    def _passkey_lengths(self, ctx) -> list[int]:
        lengths = ctx.config.passkey_lengths
        if lengths is None:
            limit = self._limit(ctx)
            lengths = [limit // 2, limit * 5 // 4]
        return lengths

    def units(self, ctx):
        return [{"part": "nll"}] + ([{"part": "passkey"}] if self._passkey_lengths(ctx) else [])

    def run_unit(self, ctx, unit):
        from .long_context import long_token_windows, nll_curves, passkey_accuracy
        from .models import plain_hf_model
        from .tasks import load_examples

        config = ctx.config
        model, tokenizer = plain_hf_model(ctx.model), ctx.model.tokenizer
        if unit["part"] == "passkey":
            return passkey_accuracy(
                model,
                tokenizer,
                self._passkey_lengths(ctx),
                n_trials=config.passkey_trials,
                n_global=config.n_global,
                seed=config.seed,
                progress=not config.quiet,
            ).to_json()
        if config.text is not None:
            texts = [config.text.read_text()]
        else:
            texts = (e.text for e in load_examples(config.task, config.data))
        length = config.length or self._limit(ctx) * 3 // 2
        windows = long_token_windows(tokenizer, texts, length, config.n_windows)
        return nll_curves(
            model,
            windows,
            bin_size=config.bin_size,
            n_global=config.n_global,
            progress=not config.quiet,
        ).to_json()

    def finish(self, ctx, records):
        import matplotlib

        matplotlib.use("Agg")
        from .long_context import NLLCurves, PasskeyResult
        from .plotting import plot_nll, plot_passkey

        config = ctx.config
        parts = {r.pop("part"): r for r in map(dict, records)}
        curves = NLLCurves(**parts["nll"])
        passkey = PasskeyResult(**parts["passkey"]) if "passkey" in parts else None
        if config.text is not None:
            source = str(config.text)
        else:
            source = f"{config.task} texts from {config.data or 'the hub'}, joined by blank lines"
        payload = {
            "model": str(config.model),
            "text": source,
            "pretrain_length": curves.pretrain_length,
            "n_global": config.n_global,
            "nll": curves.to_json(),
            "passkey": passkey.to_json() if passkey else None,
        }
        path = write_json(config.out, "long_context.json", payload)
        name = str(config.model)
        plot_nll(curves, title=f"{name}: NLL per position").savefig(config.out / "nll.png", dpi=150)
        if passkey:
            plot_passkey(passkey, title=f"{name}: passkey").savefig(
                config.out / "passkey.png", dpi=150
            )
        past = {m: _fmt(v["mean_nll_past_L"]) for m, v in curves.summary.items()}
        print(f"mean NLL past L={curves.pretrain_length}: {past} -> {path}")
        if passkey:
            print(f"passkey accuracy at {passkey.lengths}: {passkey.accuracy}")
        return payload


# ------------------------------------------------------------- ICL as implicit fine-tuning
# Dai et al. (Findings of ACL 2023): FT trains K/V on one demonstration set, so the unit is a
# seed (that set, its queries, its validation split and the whole lr sweep).
DUAL_FORM_LRS = [1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]


@dataclass
class DualFormConfig(RunConfig):
    demo_mode: str = field(default="fixed")  # FT trains on one demonstration set
    shots: int = option(4, help="demonstrations per class: ICL's context and FT's training set",
                        positive=True)  # fmt: skip
    lrs: list[float] = option(
        DUAL_FORM_LRS, help="SGD learning rates for K/V fine-tuning (every one is reported)",
        type=float,
    )  # fmt: skip
    validation_per_class: int = option(
        8,
        help="validation examples per class choosing the lr (from the demonstration pool, "
        "never a query or a demonstration; fewer, with a note, when the pool has fewer left)",
        positive=True,
    )
    record_at: str = option(
        "last",
        help="recorded token: the last token (the paper) or an appended first label token "
        "(the official code)",
        choices=["last", "label_token"],
    )
    kendall_query: str = option(
        "pre_rotary",
        help="query vectors of Kendall's dual-form q·q: hook_q (pre_rotary) or hook_rot_q",
        choices=["pre_rotary", "post_rotary"],
    )
    simam_scores: str = option(
        "post_rotary",
        help="scores read by SimAM and Kendall's ICL side: the model's hook_attn_scores "
        "(post_rotary) or q·k/√d from hook_q and hook_k (pre_rotary)",
        choices=["pre_rotary", "post_rotary"],
    )
    kendall_n: int = option(100, help="queries in Kendall (the paper: 100)", positive=True)
    momentum_eta: list[float] = option(
        [],
        help="also measure ICL accuracy with momentum attention at these η (all, shallow and "
        "deep layers; an inference-time extension, the paper trains it)",
        type=float,
        nargs="*",
    )


class DualForm(UnitExperiment):
    """ZSL vs ICL vs K/V fine-tuning (Dai et al. §5), one unit per seed; momentum attention."""

    name = "dual-form"
    config_cls = DualFormConfig
    unit_name = "seed"
    units = staticmethod(_seed_units)

    def context(self, config, dist):
        from .dualform import check_lrs

        check_lrs(config.lrs)  # before the model loads
        return super().context(config, dist)

    def run_unit(self, ctx, unit):
        from .dualform import compare_settings
        from .episodes import draw_episode
        from .momentum import momentum_accuracy
        from .tasks import sample_demonstrations

        config: DualFormConfig = ctx.config
        seed = unit["seed"]
        episode = draw_episode(
            ctx.task, ctx.pools, shots=config.shots, n=config.n, seed=seed, mode="fixed"
        )
        demos = episode.demonstrations
        used = {e.text for e in [*episode.queries, *demos]}
        left = [sum(e.label == c and e.text not in used for e in ctx.pools.demos)
                for c in range(ctx.task.n_classes)]  # fmt: skip
        per_class = min(config.validation_per_class, *left)
        if per_class == 0:
            raise ValueError(
                f"No validation example left for the lr choice: after the {config.shots} "
                "demonstrations per class, a class of the demonstration pool is empty. Give a "
                "larger pool (--demo-data) or fewer --shots."
            )
        if per_class < config.validation_per_class and ctx.dist.rank == 0:
            print(
                f"anchor-lens: note: the demonstration pool leaves {per_class} validation "
                f"example(s) per class for the lr choice, not {config.validation_per_class}; "
                "give a larger pool (--demo-data) for more.",
                file=sys.stderr,
            )
        validation = sample_demonstrations(
            ctx.pools.demos, ctx.task, per_class, seed=seed + 1, exclude=[*episode.queries, *demos]
        )
        result = compare_settings(
            ctx.model,
            ctx.task,
            demos,
            episode.queries,
            validation,
            config.lrs,
            record_at=config.record_at,
            kendall_query=config.kendall_query,
            simam_scores=config.simam_scores,
            kendall_n=config.kendall_n,
            batch_size=config.batch_size,
            seed=seed,
        )
        record = result.to_json() | {
            "demonstrations": [{"text": d.text, "label": d.label} for d in demos]
        }
        if config.momentum_eta:
            record["momentum"] = momentum_accuracy(
                ctx.model,
                ctx.task,
                demos,
                episode.queries,
                config.momentum_eta,
                batch_size=config.batch_size,
            )
        return record

    def finish(self, ctx, records):
        import matplotlib

        matplotlib.use("Agg")
        from .dualform import (
            dual_form_findings,
            dual_form_markdown,
            plot_dual_form,
            plot_lr_sweep,
            summarise_seeds,
        )

        config: DualFormConfig = ctx.config
        summary = summarise_seeds(records)
        momentum = _momentum_table(records)
        summary |= {
            "momentum": momentum,
            "settings": records[0]["settings"] | {"shots": config.shots},
            **provenance(ctx),
            "seeds": records,
        }
        path = write_json(config.out, "dual_form.json", summary)
        title = f"{ctx.task.name} · {config.model}"
        plot_dual_form(summary, title=title).savefig(config.out / "fig_dual_form.png", dpi=150)
        plot_lr_sweep(summary, title=title).savefig(config.out / "fig_lr_sweep.png", dpi=150)
        extra = (
            f"Protocol: seeds {', '.join(str(r['seed']) for r in records)}; "
            f"{config.shots} demonstration(s) per class, one set per seed shared by ICL and FT "
            f"(in the same order), from {ctx.pools.demo_source}; lr chosen on "
            f"{records[0]['n_validation']} validation examples from the demonstration pool "
            f"(ties: the smaller lr); recorded token: {config.record_at}; Kendall on the first "
            f"{records[0]['n_kendall']} queries, q·q from {config.kendall_query} query vectors; "
            f"SimAM from {config.simam_scores} scores."
        )
        if momentum:
            rows = "\n".join(
                f"| {m['eta']:g} | {m['layers']} | {m['accuracy']:.3f} |" for m in momentum
            )
            extra += (
                "\n\nMomentum attention added at inference time (not trained, unlike the "
                "paper), ICL accuracy (seed mean):\n\n| η | layers | accuracy |\n|---|---|---|\n"
                + rows
            )
        findings = dual_form_findings(summary)
        (config.out / "report.md").write_text(
            dual_form_markdown(
                summary, model=str(config.model), task=ctx.task.name, extra=extra,
                findings=findings,
            )
        )  # fmt: skip
        held, checked = report.tally(findings)
        sel = summary["selected"]
        print(
            f"{ctx.task.name}: {held}/{checked} checkable claims of Dai et al. hold "
            f"(n={summary['n']}, {len(records)} seed(s)); SimAOU {_fmt(sel['simaou']['mean'])}, "
            f"SimAM {_fmt(sel['simam_after']['mean'])} vs "
            f"{_fmt(summary['baselines']['simam_before']['mean'])}, Kendall "
            f"{_fmt(sel['kendall_token']['mean'])}, Rec2FTP {_fmt(sel['rec2ftp']['value'])} "
            f"-> {path}"
        )
        return summary


def _momentum_table(records: list[dict]) -> list[dict]:
    """Seed-mean ICL accuracy per (η, layers) row of the units' momentum measurements."""
    if "momentum" not in records[0]:
        return []
    rows = records[0]["momentum"]
    return [
        {
            "eta": row["eta"],
            "layers": row["layers"],
            "accuracy": statistics.fmean(r["momentum"][i]["accuracy"] for r in records),
        }
        for i, row in enumerate(rows)
    ]
