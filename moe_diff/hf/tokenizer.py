"""The tokenizer files of an exported model: the run's tokenizer.json copied, or the built-in byte tokenizer
written as an equivalent `tokenizers` tokenizer (byte b is id b, the end-of-text token after them)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as TokenizerFile
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from moe_diff.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

BYTE_EOT_TOKEN = "<|endoftext|>"


def byte_tokenizer_file() -> TokenizerFile:
    """ByteTokenizer as a `tokenizers` tokenizer: byte-level characters, one token each (no merges), in byte
    order, so that ids and decoded text are the same as ByteTokenizer's."""
    characters = bytes_to_unicode()  # byte -> the printable character byte-level tokenizers use for it
    vocab = {characters[byte]: byte for byte in range(256)}
    tokenizer = TokenizerFile(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BYTE_EOT_TOKEN])  # id 256: ByteTokenizer.eot_id
    return tokenizer


def fast_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """`tokenizer` as transformers' tokenizer: end-of-text as eos and pad, left padding (generation pads on the
    left)."""
    if isinstance(tokenizer, ByteTokenizer):
        file, eot = byte_tokenizer_file(), BYTE_EOT_TOKEN
    else:
        assert isinstance(tokenizer, HFTokenizer)
        file = TokenizerFile.from_file(tokenizer.name)
        eot = file.id_to_token(tokenizer.eot_id)
    return PreTrainedTokenizerFast(tokenizer_object=file, eos_token=eot, pad_token=eot, padding_side="left",
                                   model_max_length=max_length)


def write_tokenizer(tokenizer: Tokenizer, directory: Path, max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json for AutoTokenizer (see fast_tokenizer)."""
    fast_tokenizer(tokenizer, max_length).save_pretrained(directory)
