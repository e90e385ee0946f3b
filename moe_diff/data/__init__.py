"""Training data: tokenizers, corpora (built-in, text, JSONL, token files), packed batches and sampling."""

from moe_diff.data.batches import (
    Batch,
    BatchSampler,
    PackedSequences,
    fixed_batches,
    make_batch,
    validation_batches,
)
from moe_diff.data.corpus import Corpus, load_corpus, split_digest, tokenize_corpus
from moe_diff.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, check_vocabulary, load_tokenizer
from moe_diff.errors import DataError

__all__ = ["Batch", "BatchSampler", "ByteTokenizer", "Corpus", "DataError", "HFTokenizer", "PackedSequences",
           "Tokenizer", "check_vocabulary", "fixed_batches", "load_corpus", "load_tokenizer", "make_batch",
           "split_digest", "tokenize_corpus", "validation_batches"]
