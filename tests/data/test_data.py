"""Training data: sources, tokenizers, splits, packing and resumable sampling."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_diff.config import ConfigError, DataConfig
from moe_diff.data import (
    BatchSampler,
    ByteTokenizer,
    DataError,
    PackedSequences,
    fixed_batches,
    load_corpus,
    load_tokenizer,
    make_batch,
    tokenize_corpus,
)
from moe_diff.data.corpus import builtin_files, corpus_files

BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def builtin_corpus():
    return load_corpus(DataConfig(), BYTES)


def documents(stream: np.ndarray) -> list[str]:
    """The decoded documents of a token stream, sorted."""
    ends = np.flatnonzero(stream == BYTES.eot_id)
    return sorted(BYTES.decode(part.tolist()) for part in np.split(stream, ends + 1) if len(part))


def write_texts(directory: Path, n: int = 6) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"doc{i}.txt").write_text(f"document {i}: " + "héllo wörld " * (i + 3))


def test_builtin_corpus_is_the_standard_library_without_tests(builtin_corpus) -> None:
    names = [name for name, _ in builtin_files()]
    assert "os.py" in names and "json/decoder.py" in names
    skipped = {"test", "tests", "idle_test", "site-packages"}
    assert not any(part in skipped for name in names for part in Path(name).parts)
    train_docs, val_docs = builtin_corpus.n_documents
    assert train_docs > 10 * val_docs > 0
    assert builtin_corpus.train.dtype == np.uint16 and builtin_corpus.train[-1] == BYTES.eot_id


def test_builtin_corpus_is_deterministic(builtin_corpus) -> None:
    again = load_corpus(DataConfig(), BYTES)
    assert np.array_equal(again.train, builtin_corpus.train) and np.array_equal(again.val, builtin_corpus.val)


def test_byte_tokenizer_round_trips_unicode() -> None:
    text = "naïve café — ∑ 😀"
    assert BYTES.decode(BYTES.encode(text).tolist()) == text


def test_text_directory_glob_and_jsonl_sources(tmp_path: Path) -> None:
    write_texts(tmp_path / "texts")
    by_dir = load_corpus(DataConfig(source=str(tmp_path / "texts"), val_fraction=0.3), BYTES)
    by_glob = load_corpus(DataConfig(source=[str(tmp_path / "texts" / "*.txt")], val_fraction=0.3), BYTES)
    assert np.array_equal(by_dir.train, by_glob.train) and sum(by_dir.n_documents) == 6
    records = [{"body": f"record {i} " * 5} for i in range(5)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    corpus = load_corpus(DataConfig(source=str(tmp_path / "r.jsonl"), text_field="body"), BYTES)
    assert sum(corpus.n_documents) == 5 and min(corpus.n_documents) >= 1
    assert sorted(documents(corpus.train) + documents(corpus.val)) == sorted(r["body"] for r in records)


def test_builtin_mixes_with_paths_and_sidecars_are_not_documents(tmp_path: Path) -> None:
    write_texts(tmp_path / "texts", n=2)
    texts = DataConfig(source=str(tmp_path / "texts"))
    tokenize_corpus(texts, tmp_path / "texts" / "tokens.bin", progress=False)
    names = [name for name, _ in corpus_files(DataConfig(source=["builtin", str(tmp_path / "texts")]))]
    assert "os.py" in names and not any(name.endswith("tokens.json") for name in names)
    assert sum(name.endswith(("doc0.txt", "doc1.txt", "tokens.bin")) for name in names) == 3


def test_split_does_not_depend_on_where_the_data_lies_or_how_it_is_named(tmp_path: Path, monkeypatch) -> None:
    """A document's name, which decides its split, is its path from the source's root: the same corpus moved,
    named by an absolute or a relative path or by a glob, splits the same (JSONL records by line included)."""
    write_texts(tmp_path / "a" / "texts", n=20)
    lines = "\n".join(json.dumps({"text": f"record {i} " * 4}) for i in range(20))
    (tmp_path / "a" / "texts" / "records.jsonl").write_text(lines + "\n")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    monkeypatch.chdir(tmp_path / "elsewhere")
    ways = [str(tmp_path / "a" / "texts"), "b/texts", str(tmp_path / "a" / "texts" / "*"), "b/texts/*"]
    splits = [load_corpus(DataConfig(source=way, val_fraction=0.3), BYTES) for way in ways]
    assert len({tuple(corpus.val_names) for corpus in splits}) == 1 and 0 < len(splits[0].val_names) < 40
    assert corpus_files(DataConfig(source=ways[1]))[0][0] == "doc0.txt"
    overlapping = corpus_files(DataConfig(source=["b/texts", "b/texts/doc1.txt", "b"]))  # one file, one name
    assert {name for name, _ in overlapping} == {name for name, _ in corpus_files(DataConfig(source="b/texts"))}
    assert len(overlapping) == 2 * 21 + 1
    assert all(documents(corpus.val) == documents(splits[0].val) for corpus in splits)


def test_split_does_not_depend_on_file_order(tmp_path: Path) -> None:
    write_texts(tmp_path / "a", n=12)
    files = sorted(str(p) for p in (tmp_path / "a").iterdir())
    forward = load_corpus(DataConfig(source=files, val_fraction=0.3), BYTES)
    backward = load_corpus(DataConfig(source=files[::-1], val_fraction=0.3), BYTES)
    assert forward.n_documents == backward.n_documents
    assert sorted(documents(forward.val)) == sorted(documents(backward.val))  # the same split, in file order
    assert sorted(documents(forward.train)) == sorted(documents(backward.train))


def test_tokenized_bin_equals_tokenizing_the_text(tmp_path: Path) -> None:
    write_texts(tmp_path / "texts")
    source = DataConfig(source=str(tmp_path / "texts"), val_fraction=0.3)
    info = tokenize_corpus(source, tmp_path / "tokens.bin", progress=False)
    assert info["n_documents"] == 6 and info["dtype"] == "uint16"
    from_text = load_corpus(source, BYTES)
    from_bin = load_corpus(DataConfig(source=[str(tmp_path / "tokens.bin"), str(tmp_path / "tokens.bin")],
                                      val_fraction=0.3), BYTES)
    assert sorted(documents(from_bin.train) + documents(from_bin.val)) == sorted(
        2 * (documents(from_text.train) + documents(from_text.val)))
    (tmp_path / "tokens.json").unlink()  # without the sidecar, the element type must be given
    with pytest.raises(DataError, match="data.token_dtype"):
        load_corpus(DataConfig(source=str(tmp_path / "tokens.bin")), BYTES)
    raw = load_corpus(DataConfig(source=str(tmp_path / "tokens.bin"), token_dtype="uint16"), BYTES)
    assert isinstance(raw.train, np.memmap) and len(raw.train) + len(raw.val) == info["n_tokens"]
    assert raw.train[-1] == BYTES.eot_id and sum(raw.n_documents) == 6  # split at a document boundary


def test_token_files_that_do_not_fit_are_named(tmp_path: Path) -> None:
    write_texts(tmp_path / "texts")
    cfg = DataConfig(source=str(tmp_path / "texts"))
    with pytest.raises(DataError, match="must end in .bin"):
        tokenize_corpus(cfg, tmp_path / "tokens.dat", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt' holds no non-empty documents"):
        tokenize_corpus(DataConfig(source=str(tmp_path / "empty.txt")), tmp_path / "x.bin", progress=False)
    (tmp_path / "empty.txt").unlink()
    tokenize_corpus(cfg, tmp_path / "tokens.bin", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts", "tokens.bin", "tokens.json"]  # no partials
    meta = json.loads((tmp_path / "tokens.json").read_text())
    (tmp_path / "tokens.json").write_text(json.dumps({**meta, "eot_id": 0, "tokenizer": "other.json"}))
    with pytest.raises(DataError, match="tokens.bin was tokenised with 'other.json'.*data.tokenizer='byte'"):
        load_corpus(DataConfig(source=str(tmp_path / "tokens.bin")), BYTES)
    (tmp_path / "tokens.json").write_text(json.dumps({**meta, "n_tokens": meta["n_tokens"] + 1}))
    with pytest.raises(DataError, match="its sidecar says"):
        load_corpus(DataConfig(source=str(tmp_path / "tokens.bin")), BYTES)


def test_raw_uint32_tokens_expose_their_vocabulary(tmp_path: Path) -> None:
    tokens = np.array([70_000, 5, 256, 7, 8, 256, 9, 256], dtype="<u4")
    tokens.tofile(tmp_path / "big.bin")
    (tmp_path / "more.txt").write_text("more text")
    cfg = DataConfig(source=[str(tmp_path / "big.bin"), str(tmp_path / "more.txt")], token_dtype="uint32")
    corpus = load_corpus(cfg, BYTES)
    assert corpus.vocab_size == 70_001 and corpus.train.dtype == np.uint32 and sum(corpus.n_documents) == 4
    assert 70_000 in np.concatenate([corpus.train, corpus.val])
    with pytest.raises(DataError, match="not a positive whole number of uint32 tokens"):
        (tmp_path / "odd.bin").write_bytes(b"abc")
        load_corpus(DataConfig(source=str(tmp_path / "odd.bin"), token_dtype="uint32"), BYTES)


def test_hf_tokenizer_json_end_to_end(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "hello": 2, "world": 3}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    write_texts(tmp_path / "texts")
    (tmp_path / "texts" / "hw.txt").write_text("hello world hello")
    cfg = DataConfig(source=str(tmp_path / "texts"), tokenizer=str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(cfg)
    assert (loaded.vocab_size, loaded.eot_id) == (4, 1)
    assert loaded.encode("hello world").tolist() == [2, 3]
    assert loaded.decode(loaded.encode("hello world").tolist()) == "hello world"
    corpus = load_corpus(cfg, loaded)
    assert set(np.unique(np.concatenate([corpus.train, corpus.val]))) <= {0, 1, 2, 3}
    assert min(corpus.n_documents) >= 1 and corpus.eot_id == 1 and corpus.vocab_size == 4
    tokenize_corpus(cfg, tmp_path / "hf.bin", progress=False)
    from_bin = load_corpus(DataConfig(source=str(tmp_path / "hf.bin"), tokenizer=cfg.tokenizer), loaded)
    assert sorted(np.concatenate([from_bin.train, from_bin.val]).tolist()) == sorted(
        np.concatenate([corpus.train, corpus.val]).tolist())
    with pytest.raises(DataError, match="data.eot_token"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "tokenizer.json"), eot_token="</s>"))


@pytest.mark.parametrize(("make", "needle"), [
    (lambda d: DataConfig(source=str(d / "missing.txt")), "missing.txt' matches no file"),
    (lambda d: DataConfig(source=str(d / "*.nothing")), "*.nothing' matches no file"),
    (lambda d: DataConfig(source=[str(d / "empty.txt"), str(d / "blank.jsonl")]),
     "empty.txt', '/TMP/blank.jsonl'] holds no non-empty documents"),
    (lambda d: DataConfig(source=str(d / "bad.jsonl")), "bad.jsonl:2 is not valid JSON"),
    (lambda d: DataConfig(source=str(d / "nofield.jsonl")),
     "nofield.jsonl:1 has no string field 'text' (data.text_field)"),
    (lambda d: DataConfig(source=str(d / "raw.bin")),
     "raw.bin has no .json sidecar saying its element type; set data.token_dtype"),
    (lambda d: DataConfig(tokenizer=str(d / "none.json")), "data.tokenizer='/TMP/none.json': no such file"),
    (lambda d: DataConfig(tokenizer=str(d / "bad.jsonl")), "data.tokenizer='/TMP/bad.jsonl' is not readable"),
])
def test_bad_sources_are_named(tmp_path: Path, make, needle: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "raw.bin")
    cfg = make(tmp_path)
    with pytest.raises(DataError) as error:
        load_corpus(cfg, load_tokenizer(cfg))
    assert needle.replace("/TMP", str(tmp_path)) in str(error.value)


def test_bad_data_config_values_are_named() -> None:
    with pytest.raises(ConfigError, match="data.val_fraction=1.5"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ConfigError, match="data.val_fraction=0"):
        DataConfig(val_fraction=0)
    with pytest.raises(ConfigError, match="data.source"):
        DataConfig(source=[])
    with pytest.raises(ConfigError, match="data.token_dtype='int8'.*uint16"):
        DataConfig(token_dtype="int8")


def test_packing_targets_positions_and_documents() -> None:
    eot = 9
    stream = np.array([1, 2, 9, 3, 4, 5, 9, 6, 7, 9, 8, 1, 2], dtype=np.uint16)
    windows = PackedSequences(stream, seq_len=6, eot_id=eot)
    assert len(windows) == 2
    batch = make_batch(windows, [0, 1])
    assert batch.tokens[0].tolist() == [1, 2, 9, 3, 4, 5] and batch.targets[0].tolist() == [2, 9, 3, 4, 5, 9]
    assert batch.positions[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.document_ids[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.tokens[1].tolist() == [9, 6, 7, 9, 8, 1]
    assert batch.positions[1].tolist() == [0, 0, 1, 2, 0, 1]
    assert batch.document_ids[1].tolist() == [0, 1, 1, 1, 2, 2]
    assert batch.slice(1, 2).tokens.tolist() == [batch.tokens[1].tolist()]
    assert batch.tokens.dtype == batch.positions.dtype == batch.document_ids.dtype == torch.int64
    with pytest.raises(DataError, match=r"13 tokens, fewer than train.seq_len \+ 1 = 21"):
        PackedSequences(stream, seq_len=20, eot_id=eot)


def test_fixed_batches_are_evenly_spaced_and_stable() -> None:
    windows = PackedSequences(np.arange(101, dtype=np.uint16), seq_len=10, eot_id=0)
    batches = fixed_batches(windows, batch_size=2, n_batches=2)
    assert [b.tokens[:, 0].tolist() for b in batches] == [[0, 20], [50, 70]]
    assert [len(b.tokens) for b in fixed_batches(windows, batch_size=4, n_batches=5)] == [4, 4, 2]  # all 10


def test_sampler_covers_each_epoch_and_resumes_exactly() -> None:
    uninterrupted = list(itertools.islice(BatchSampler(n_windows=10, batch_size=4, seed=3), 8))
    flat = [i for batch in uninterrupted for i in batch]
    assert sorted(flat[:10]) == sorted(flat[10:20]) == sorted(flat[20:30]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a fresh order each epoch
    for cut in (1, 2, 3, 5):  # mid-epoch and across epoch boundaries
        resumed = BatchSampler(n_windows=10, batch_size=4, seed=3)
        for _ in range(cut):
            resumed.next_indices()
        state = json.loads(json.dumps(resumed.state_dict()))
        fresh = BatchSampler(n_windows=10, batch_size=4, seed=3)
        fresh.load_state_dict(state)
        assert [fresh.next_indices() for _ in range(8 - cut)] == uninterrupted[cut:]
    assert BatchSampler(10, 4, seed=4).next_indices() != uninterrupted[0]
