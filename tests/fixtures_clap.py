"""Tiny random CLAP checkpoint and bundles built from it (session scope; weights never downloaded).

The checkpoint is a ``ClapModel`` from a small ``ClapConfig`` (same code path as
laion/clap-htsat-unfused: 4 Swin stages, window 8, spec 256, 64 mel bins, unfused) plus a
``ClapProcessor`` (rand_trunc feature extractor + a byte-level BPE RoBERTa tokenizer trained
here on a few sentences), saved with ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = [
    "a dog barks twice in the distance",
    "chainsaw cutting wood in the forest",
    "rain falling on a tin roof with thunder",
    "birds singing at dawn near a river",
    "a car engine starts and drives away",
    "people talking in a busy cafe",
    "wind blowing through tall grass",
    "a siren passes on a city street",
]


def tiny_clap_config():  # noqa: ANN201
    from transformers import ClapConfig

    return ClapConfig(
        text_config={
            "vocab_size": 1000,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 80,
        },
        audio_config={
            "patch_embeds_hidden_size": 16,
            "depths": [1, 1, 1, 1],
            "num_attention_heads": [1, 2, 2, 4],
            "hidden_size": 128,
            "enable_fusion": False,
            "spec_size": 256,
            "num_mel_bins": 64,
            "window_size": 8,
        },
        projection_dim=32,
    )


def save_tiny_clap(out: Path, seed: int = 0) -> Path:
    """Write a tiny random CLAP checkpoint directory (model + processor) to ``out``."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 4, vocab_size=1000, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    vocab_dir = out / "_bpe"
    vocab_dir.mkdir()
    bpe.save_model(str(vocab_dir))
    tok = RobertaTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"), model_max_length=77)
    fe = ClapFeatureExtractor(truncation="rand_trunc")
    torch.manual_seed(seed)
    model = ClapModel(tiny_clap_config()).eval()
    ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(str(out))
    model.save_pretrained(str(out))
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\nTiny random CLAP for tests.\n", encoding="utf-8")
    for f in vocab_dir.iterdir():
        f.unlink()
    vocab_dir.rmdir()
    return out


@pytest.fixture(scope="session")
def tiny_clap_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return save_tiny_clap(tmp_path_factory.mktemp("clap") / "tiny-clap")


@pytest.fixture(scope="session")
def clap_sensitivity_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clap-sensitivity")


@pytest.fixture(scope="session")
def tiny_clap_bundle(tiny_clap_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_retrieval.export.clap import export_clap

    return export_clap(str(tiny_clap_checkpoint), tmp_path_factory.mktemp("clap-b") / "fp32", "fp32", quiet=True)


@pytest.fixture(scope="session")
def tiny_clap_bundle_int8(
    tiny_clap_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, clap_sensitivity_cache: Path
) -> Path:
    from edge_retrieval.export.clap import export_clap

    return export_clap(
        str(tiny_clap_checkpoint), tmp_path_factory.mktemp("clap-b") / "int8", "int8",
        cache_dir=clap_sensitivity_cache, quiet=True,
    )
