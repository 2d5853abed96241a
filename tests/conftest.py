"""Shared fixtures: a tiny random Llama with a word-level tokenizer, the real data, a Prefect harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n N`: the cores shared out, no oversubscription
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The reference datasets: the project's DVC copy if present, else ../shared/data."""
    for candidate in (ROOT / "data" / "raw", ROOT.parent / "shared" / "data"):
        if (candidate / "financial_phrasebank" / "all-data.csv").is_file():
            return candidate
    pytest.skip("reference datasets not found in data/raw or ../shared/data")


@pytest.fixture(scope="session")
def raw_dir() -> Path:
    return shared_data_dir()


WORDS = [
    "classify", "the", "sentiment", "of", "this", "financial", "news", "sentence", "as", "negative", ",",
    "neutral", "or", "positive", ".", "sentence", ":", "sentiment", ":", "answer", "biomedical", "research",
    "question", "with", "yes", "no", "maybe", "context", "company", "profit", "loss", "sales", "rose",
    "fell", "eur", "million", "quarter", "year", "net", "operating", "increased", "decreased",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama and a word-level tokenizer in which every label word is one token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted({w.lower() for w in WORDS} | {w for w in WORDS}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect server on 127.0.0.1 (its API URL), shared by the tests that need other processes."""
    from tests.prefect_server import local_prefect_server

    with local_prefect_server(tmp_path_factory.mktemp("prefect-server")) as api_url:
        yield api_url


@pytest.fixture
def use_prefect_server(prefect_server: str, monkeypatch: pytest.MonkeyPatch):
    """This test's flows, and the processes it starts, report to the real local server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        yield prefect_server
