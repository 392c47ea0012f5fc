"""A tiny random-weight SmolVLM2 checkpoint, built offline through the real transformers classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)

IMAGE_SIZE = 64
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # 16, as the processor computes
SEED = 1234

# Ids 0-2 as in SmolLM's tokenizer; the vision tokens follow the trained vocabulary, as in
# SmolVLM2's own (where <image> is 49190 of 49280).
LEADING_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TRAILING_SPECIALS = (
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
    "<end_of_utterance>",
)
# As in SmolVLM2's tokenizer_config.json.
ROLE_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<end_of_utterance>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}

# Every word the prompts use, plus scores written the way the answers write them, so the BPE
# learns merges such as "Ġ8" and "10" (which only a Digits pre-tokenizer keeps apart).
CORPUS = (
    "User: You are provided the following series of eight frames from a 0:00:08 [H:MM:SS] video.",
    "Frame from 00:01: Frame from 00:02: Frame from 00:10: Frame from 01:59:",
    "Assistant: Significance: 8\nDescription: A person climbs the fence.",
    "Assistant: Significance: 10\nDescription: Goal scored with a spectacular bicycle kick.",
    "Assistant: Significance: 1\nDescription: Nothing notable happens; an empty scene.",
    "System: You are watching a security camera. Focus on people, vehicles, entries and exits,"
    " and any unusual activity. Lighting changes, weather, moving foliage are not significant.",
    "What activity, if any, happens in this segment? Rate how significant this segment is on a"
    " scale from 1 (nothing notable happens) to 10 (a major event), then describe the main event"
    " in one short sentence. Answer exactly as: <1-10> <one sentence>",
    "Focus only on describing the key dramatic action or notable event occurring in this video.",
    "Give a concise summary of the main events: camera movements, cuts, transitions, lighting.",
    "Scores: 2 3 4 5 6 7 9 0, 2/10, 7 out of 10, 42, 100, 2026.",
)


def train_bpe(isolate_digits: bool = True) -> Tokenizer:
    """Byte-level BPE like SmolLM's, trained on ``CORPUS``; ids 0-2 are ``LEADING_SPECIALS``.

    Args:
        isolate_digits: Put SmolLM's ``Digits(individual_digits=True)`` before ``ByteLevel``.
            Without it, numbers and " 8" merge into single tokens (a tokenizer a logit read
            of the score cannot use).
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if isolate_digits
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=list(LEADING_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """SmolVLM2's role and vision tokens on top; vision tokens missing so far get the next ids."""
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        **ROLE_TOKENS,
        additional_special_tokens=list(TRAILING_SPECIALS),
    )


def build_tokenizer(isolate_digits: bool = True) -> PreTrainedTokenizerFast:
    """The tiny checkpoint's tokenizer; see ``train_bpe``."""
    return wrap_tokenizer(train_bpe(isolate_digits))


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a single token."""
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int)
    return found


def build_config(tokenizer: PreTrainedTokenizerFast) -> SmolVLMConfig:
    """A SmolVLM2 config with tiny dimensions and ids taken from ``tokenizer``."""
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }
    return SmolVLMConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config,
        scale_factor=SCALE_FACTOR,
        image_token_id=token_id(tokenizer, "<image>"),
        tie_word_embeddings=False,
    )


def build_image_processor(longest_edge: int = IMAGE_SIZE) -> SmolVLMImageProcessorPil:
    """SmolVLM2's image processor settings at a ``longest_edge`` square (512 in the real model)."""
    return SmolVLMImageProcessorPil(
        do_image_splitting=False,
        max_image_size={"longest_edge": longest_edge},
        size={"longest_edge": longest_edge},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def save_processor_files(
    directory: Path, tokenizer: PreTrainedTokenizerFast, image_seq_len: int, longest_edge: int
) -> None:
    """Tokenizer, image processor and ``processor_config.json``: the real checkpoints' layout."""
    tokenizer.save_pretrained(directory)
    build_image_processor(longest_edge).save_pretrained(directory)
    processor_config = {"image_seq_len": image_seq_len, "processor_class": "SmolVLMProcessor"}
    (directory / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")


def build_tiny_smolvlm(directory: Path, *, isolate_digits: bool = True) -> Path:
    """Write a tiny random SmolVLM2 checkpoint (about 1 MB) to ``directory`` and return it.

    Args:
        directory: Created if missing.
        isolate_digits: See ``build_tokenizer``; False gives a tokenizer that merges numbers.
    """
    import torch  # noqa: PLC0415 - conftest imports this module in venvs without torch (mlx)

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(isolate_digits=isolate_digits)
    config = build_config(tokenizer)
    torch.manual_seed(SEED)
    model = SmolVLMForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    save_processor_files(directory, tokenizer, IMAGE_SEQ_LEN, IMAGE_SIZE)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SmolVLM2 checkpoint directory, built once per test session."""
    return build_tiny_smolvlm(tmp_path_factory.mktemp("tiny-smolvlm2"))
