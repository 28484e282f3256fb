"""Shared fixtures: a tiny randomly initialised model (offline, built here) for fast algorithm tests."""
import string
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"  # reference material beside the checkout; absent in a user's clone


def build_tiny_model(out_dir, hidden=32, layers=2, seed=0):
    """A 2-layer Llama over a character-level vocabulary (~80 tokens), saved like any HF model dir.
    No chat template, so the scripts use the plain 'Question: ... Answer:' prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import common

    chars = list(string.ascii_letters + string.digits + " .,:?+-*=()\\{}$\n")
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, eos_token_id=1, pad_token_id=1, bos_token_id=None,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 1
    return common.save_pretrained_atomic(model, tokenizer, out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The embedded SmolLM2-135M-Instruct, converted once to the safetensors cache."""
    import common
    return common.resolve_model_path(common.DEFAULT_MODEL)
