"""Training small transformers on the synthetic ICL tasks, and the three ways out of a plateau.

One entry point, [`train`][anchor_lens.plateau.train.train], trains a
[`PlateauTransformer`][anchor_lens.plateau.model.PlateauTransformer] with Adam on batches drawn
on the fly, logs the per-position ICL accuracy on a fixed held-out set (and the two probes)
every ``eval_every`` steps, and runs one of four strategies (Fu et al., ICML 2024, §5):

* ``baseline`` — every batch from the target task.
* ``warmup`` — the first ``warmup_steps`` batches from the easy task ``D_fix`` (``m = 1``),
  then the target task: the weights component, shared across difficulties, is learnt where
  it is easy.
* ``mixed`` — throughout, a fraction ``mix_fraction`` of every batch from ``D_fix``.
* ``aux`` — the target task with an auxiliary loss on the weights component: the official
  code's ``loss = CE(labels) + 0.1 · CE(item's factor values)``, the factor values read from
  ``F · V`` extra output dimensions at the item positions (``aux_weight``). For the linear
  task the extra dimensions regress the input ``x`` (squared error).

Every strategy evaluates on the target task only and counts every optimizer step (warm-up
included). Runs are seeded (model initialisation and data stream), so the same config gives
the same curve; with ``checkpoint=`` a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .curves import PlateauLength, late_accuracy, plateau_length
from .model import PlateauModelConfig, PlateauTransformer, encode_pairs
from .probes import context_component_probe, cpu_threads, weights_component_probe
from .tasks import FactorBatch, FactorTask, LinearBatch, LinearTask

__all__ = [
    "STRATEGIES",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "eval_split",
    "evaluate_icl",
    "strategy_batch",
    "train",
    "training_loss",
]

STRATEGIES = ("baseline", "warmup", "mixed", "aux")

Task = FactorTask | LinearTask
Batch = FactorBatch | LinearBatch


@dataclass
class TrainConfig:
    """How one run trains: strategy, steps, batch, optimizer, logging."""

    strategy: str = "baseline"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 500
    mix_fraction: float = 0.25
    aux_weight: float = 0.1
    eval_every: int = 100
    eval_sequences: int = 512
    probe_every: int = 500
    probe_layer: int = -1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1  # CPU threads while training (None: torch's setting)

    #: Fields that change how a run goes, not what it computes (a checkpoint resumes across them).
    RUN_ONLY = ("device", "threads")

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}."
            )
        if self.probe_every % self.eval_every:
            raise ValueError(
                f"probe_every={self.probe_every} is not a multiple of eval_every="
                f"{self.eval_every}: probes run at evaluation steps; choose a multiple (or 0)."
            )
        if not 0 <= self.mix_fraction < 1:
            raise ValueError(
                f"mix_fraction is a share of the batch in [0, 1), got {self.mix_fraction}"
            )
        if self.strategy == "warmup" and not 0 < self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup needs 0 < warmup_steps < steps, got warmup_steps={self.warmup_steps} "
                f"and steps={self.steps}: warm-up steps count towards the total."
            )

    def to_json(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        return {k: v for k, v in self.to_json().items() if k not in self.RUN_ONLY}


@dataclass
class TrainResult:
    """A run's logged curves and its plateau length.

    ``accuracy[i][p]`` is the held-out score at pair ``p`` after ``steps[i]`` optimizer steps
    (accuracy for the factor task, R² for the linear task); ``late`` its mean over the second
    half of the pairs; probes are logged every ``probe_every`` steps (``None`` in between).
    """

    steps: list[int] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    accuracy: list[list[float]] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    weights_probe: list[float | None] = field(default_factory=list)
    context_probe: list[float | None] = field(default_factory=list)
    plateau: PlateauLength | None = None
    wall_s: float = 0.0

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "plateau"}
        out["plateau"] = self.plateau.to_json() if self.plateau else None
        return out


def build_model(task: Task, cfg: PlateauModelConfig | None = None, *, seed: int = 0):
    """A ``PlateauTransformer`` sized for ``task`` (read-in, read-out, auxiliary dims).

    ``cfg`` gives layers, width and heads; the task fixes ``d_in``, ``n_out``, ``n_aux`` and
    ``n_ctx``. The initialisation is drawn from ``seed`` without touching the global RNG.
    """
    cfg = cfg or PlateauModelConfig()
    if isinstance(task, FactorTask):
        d_in, n_out, n_aux = (
            task.d_item + task.n_values,
            task.n_values,
            task.n_factors * task.n_values,
        )
    else:
        d_in, n_out, n_aux = task.d + 1, 1, task.d
    sized = PlateauModelConfig(
        cfg.n_layers, cfg.d_model, cfg.n_heads, d_in, n_out, n_aux, 2 * task.n_pairs, cfg.d_mlp
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PlateauTransformer(sized)


def strategy_batch(
    task: Task,
    easy: Task,
    cfg: TrainConfig,
    step: int,
    generator: torch.Generator,
) -> Batch:
    """The training batch of step ``step`` (0-based) under ``cfg.strategy``.

    ``easy`` is ``D_fix`` (``task.with_maps(1)``): all of the batch while warming up, a fixed
    share ``mix_fraction`` of it (its first rows) under ``mixed``.
    """
    B, dev = cfg.batch_size, cfg.device
    if cfg.strategy == "warmup" and step < cfg.warmup_steps:
        return easy.sample(B, generator, device=dev)
    if cfg.strategy == "mixed":
        k = round(cfg.mix_fraction * B)
        parts = [easy.sample(k, generator), task.sample(B - k, generator)]
        return type(parts[0]).cat(parts).to(dev)
    return task.sample(B, generator, device=dev)


def training_loss(
    model: PlateauTransformer, batch: Batch, aux_weight: float = 0.0
) -> tuple[Tensor, dict[str, float]]:
    """``loss = main + aux_weight · aux`` at the item positions, and its parts.

    Factor task: ``main`` is the cross-entropy of the labels, ``aux`` the mean cross-entropy of
    the item's ``F`` factor values from the extra output dimensions. Linear task: ``main`` is
    ``(ŷ − y)² / d``, ``aux`` the squared error of the input ``x`` from the extra dimensions.
    """
    out = _item_outputs(model, batch)
    n_out = model.cfg.n_out
    if isinstance(batch, FactorBatch):
        main = F.cross_entropy(out[..., :n_out].flatten(0, 1), batch.y.flatten())
    else:
        main = ((out[..., 0] - batch.y) ** 2).mean() / batch.x.shape[-1]
    parts = {"main": float(main.detach())}
    if aux_weight == 0:
        return main, parts
    extra = out[..., n_out:]
    if isinstance(batch, FactorBatch):
        V = extra.shape[-1] // batch.values.shape[-1]
        aux = F.cross_entropy(extra.reshape(-1, V), batch.values.flatten())
    else:
        aux = ((extra - batch.x) ** 2).mean()
    parts["aux"] = float(aux.detach())
    return main + aux_weight * aux, parts


def _item_outputs(model: PlateauTransformer, batch: Batch) -> Float[Tensor, "batch pair d_out"]:
    n_classes = model.cfg.n_out if isinstance(batch, FactorBatch) else 1
    return model(encode_pairs(batch.x, batch.y, n_classes))[:, ::2]


@torch.no_grad()
def evaluate_icl(model: PlateauTransformer, batch: Batch) -> list[float]:
    """Held-out score per pair position: accuracy (factor task) or ``R²`` (linear task)."""
    out = _item_outputs(model, batch)
    if isinstance(batch, FactorBatch):
        hit = out[..., : model.cfg.n_out].argmax(-1) == batch.y
        return hit.float().mean(0).tolist()
    err = ((out[..., 0] - batch.y) ** 2).mean(0) / batch.x.shape[-1]
    return (1 - err).tolist()


def eval_split(task: Task) -> str:
    """Where the held-out ICL set comes from (``FactorTask.sequence_test_split``)."""
    return task.sequence_test_split if isinstance(task, FactorTask) else "test"


def _eval_batch(task: Task, cfg: TrainConfig) -> Batch:
    # One fixed held-out set for the whole run, drawn apart from the training stream.
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    return task.sample(cfg.eval_sequences, g, split=eval_split(task), device=cfg.device)


def train(
    task: Task,
    cfg: TrainConfig,
    model_cfg: PlateauModelConfig | None = None,
    *,
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
    progress: bool = True,
    desc: str | None = None,
) -> tuple[TrainResult, PlateauTransformer]:
    """Train one model on ``task`` under ``cfg`` and return its curves and the model.

    ``checkpoint`` (a file) is written every ``checkpoint_every`` steps and at the end with
    the model, optimizer, data-generator state and curves; if it exists, training resumes
    from it and gives the same result as an uninterrupted run. Runs on ``cfg.threads`` CPU
    threads (restored afterwards).
    """
    with cpu_threads(cfg.threads):
        model = build_model(task, model_cfg, seed=cfg.seed).to(cfg.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed)
        easy = task.with_maps(1)
        aux_weight = cfg.aux_weight if cfg.strategy == "aux" else 0.0
        result, start = TrainResult(), 0
        running: list[float]
        if checkpoint is not None and Path(checkpoint).exists():
            state = torch.load(checkpoint, map_location=cfg.device, weights_only=False)
            if state["config"] != cfg.identity():
                raise ValueError(
                    f"{checkpoint} was written by a run with another config: delete it to start "
                    "over, or resume with the same options."
                )
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            g.set_state(state["generator"])
            result, start, running = TrainResult(**state["result"]), state["step"], state["running"]
        else:
            running = []  # training losses since the last evaluation
        eval_batch = _eval_batch(task, cfg)
        started = time.perf_counter() - result.wall_s

        def log(step: int) -> None:
            model.eval()
            acc = evaluate_icl(model, eval_batch)
            result.steps.append(step)
            result.loss.append(sum(running) / len(running) if running else None)
            result.accuracy.append(acc)
            result.late.append(late_accuracy(acc))
            probe = isinstance(task, FactorTask) and cfg.probe_every and step % cfg.probe_every == 0
            if probe:
                wp = weights_component_probe(model, task, cfg.probe_layer, device=cfg.device)
                cp = context_component_probe(model, task, cfg.probe_layer, device=cfg.device)
            result.weights_probe.append(wp.accuracy if probe else None)
            result.context_probe.append(cp.accuracy if probe else None)
            running.clear()
            model.train()

        def save(step: int) -> None:
            if checkpoint is None:
                return
            result.wall_s = time.perf_counter() - started
            state = {
                "config": cfg.identity(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": g.get_state(),
                "result": {k: v for k, v in result.__dict__.items() if k != "plateau"},
                "step": step,
                "running": list(running),
            }
            Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(checkpoint).with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(checkpoint)  # atomic: a kill never leaves half a checkpoint

        if start == 0:
            log(0)
        model.train()
        bar = tqdm(
            range(start, cfg.steps),
            initial=start,
            total=cfg.steps,
            desc=desc or cfg.strategy,
            disable=not progress,
            leave=False,
        )
        for step in bar:
            batch = strategy_batch(task, easy, cfg, step, g)
            loss, _ = training_loss(model, batch, aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(float(loss.detach()))
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                log(done)
                bar.set_postfix(loss=f"{result.loss[-1]:.3f}", late=f"{result.late[-1]:.3f}")
            if done % checkpoint_every == 0 or done == cfg.steps:
                save(done)
        bar.close()
        model.eval()
        result.wall_s = time.perf_counter() - started
        result.plateau = plateau_length(result.steps, result.late, task.chance)
        return result, model
