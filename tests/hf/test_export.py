"""`moe-diff export --format hf`: the directory loads through the Auto classes (after `import moe_diff`), through
trust_remote_code in a fresh process that never imported the package, through open_model and convert; the tokenizer
files; the refusals."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as TokenizerFile
from tokenizers import models
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import moe_diff
from moe_diff.checkpoint import schema
from moe_diff.cli import main
from moe_diff.config import ModelConfig
from moe_diff.data.tokenizers import ByteTokenizer, HFTokenizer
from moe_diff.hf.export import save_hf
from moe_diff.hf.tokenizer import byte_tokenizer_file
from moe_diff.model import MoEDiffTransformer
from tests.helpers import JSON_PACKAGE

TOKENS = torch.tensor([[5, 80, 120, 256, 33, 7, 99, 14, 200, 3]])


def checkpoint(tmp_path: Path, mode: str, **fields) -> Path:
    torch.manual_seed(0)
    fields = {"vocab_size": 257, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
              "ffn_dim": 32, "n_experts": 4, "sliding_window": 6, "max_seq_len": 64, **fields}
    cfg = ModelConfig(attention=mode, **fields)
    return schema.save(MoEDiffTransformer(cfg), tmp_path / f"ckpt-{mode}")


def export_hf(source: Path, dst: Path, *flags: str) -> None:
    assert main(["export", str(source), str(dst), "--format", "hf", "--tokenizer", "byte", *flags]) == 0


@pytest.mark.parametrize("mode", ["standard", "diff", "diff_v2"])
@torch.no_grad()
def test_export_loads_through_auto_classes_open_model_and_convert(tmp_path: Path, mode: str) -> None:
    source = checkpoint(tmp_path, mode, tie_embeddings=mode == "diff")
    dst = tmp_path / "hf"
    export_hf(source, dst)
    expected = schema.load(source).eval()(TOKENS).logits
    config = AutoConfig.from_pretrained(dst)
    assert config.model_type == "moe_diff" and config.auto_map["AutoModelForCausalLM"].startswith("modeling_moe_diff")
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert torch.equal(model(TOKENS).logits, expected)
    assert torch.equal(moe_diff.open_model(dst).model.eval()(TOKENS).logits, expected)
    assert main(["convert", str(dst), str(tmp_path / "back")]) == 0
    assert torch.equal(schema.load(tmp_path / "back").eval()(TOKENS).logits, expected)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 256 and tokenizer.padding_side == "left"
    assert model.generation_config.eos_token_id == 256


def test_standard_export_as_hf_and_as_mixtral_give_the_same_logits(tmp_path: Path) -> None:
    source = checkpoint(tmp_path, "standard", sliding_window=None)
    export_hf(source, tmp_path / "hf")
    assert main(["export", str(source), str(tmp_path / "mixtral"), "--format", "mixtral"]) == 0
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(TOKENS).logits
        mixtral = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()(TOKENS).logits
    torch.testing.assert_close(ours, mixtral, rtol=1e-5, atol=1e-5)


def test_large_weights_are_sharded_with_an_index(tmp_path: Path) -> None:
    source = checkpoint(tmp_path, "diff_v2")
    save_hf(schema.load(source), ByteTokenizer(), tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(TOKENS).logits,
                           moe_diff.open_model(tmp_path / "hf").model.eval()(TOKENS).logits)


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    directory, expected = sys.argv[1], torch.load(sys.argv[2])
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        assert torch.equal(model(expected["tokens"]).logits, expected["logits"])
    assert tokenizer("hi")["input_ids"] == [104, 105]
    print(type(model).__module__, config.model_type)
""")
WITHOUT_PACKAGE = textwrap.dedent("""
    import sys
    class Missing:  # as if moe_diff were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "moe_diff":
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Missing())
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ImportError as error:
        print(error)
""")


def test_trust_remote_code_loads_in_a_process_that_never_imported_the_package(tmp_path: Path) -> None:
    source = checkpoint(tmp_path, "diff")
    export_hf(source, tmp_path / "hf")
    with torch.no_grad():
        torch.save({"tokens": TOKENS, "logits": schema.load(source).eval()(TOKENS).logits}, tmp_path / "expected.pt")
    env = {"HF_HOME": str(tmp_path / "hf-home"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd())}
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "hf"), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "moe_diff.hf.modeling moe_diff" in run.stdout
    missing = subprocess.run([sys.executable, "-c", WITHOUT_PACKAGE, str(tmp_path / "hf")], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
    assert "requires the following packages that were not found in your environment: moe_diff" in missing.stdout, \
        missing.stdout + missing.stderr


def test_byte_tokenizer_file_encodes_and_decodes_like_the_byte_tokenizer() -> None:
    file, byte = byte_tokenizer_file(), ByteTokenizer()
    texts = [path.read_text(encoding="utf-8") for path in sorted(Path(JSON_PACKAGE).glob("*.py"))]
    texts.append("héllo wörld, ünïcode ✓ and tabs\t\r\n")
    for text in texts:
        ids = file.encode(text).ids
        assert ids == byte.encode(text).tolist()
        assert file.decode(ids) == byte.decode(ids) == text
    assert file.decode([104, 105, 256], skip_special_tokens=True) == byte.decode([104, 105, 256])
    assert file.get_vocab_size() == byte.vocab_size and file.token_to_id("<|endoftext|>") == byte.eot_id


def test_a_run_tokenizer_json_is_copied(tmp_path: Path) -> None:
    byte_tokenizer_file().save(str(tmp_path / "tokenizer.json"))
    tokenizer = HFTokenizer(str(tmp_path / "tokenizer.json"))
    source = checkpoint(tmp_path, "standard")
    save_hf(schema.load(source), tokenizer, tmp_path / "hf")
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported("def f():")["input_ids"] == tokenizer.encode("def f():").tolist()
    assert exported.eos_token == "<|endoftext|>"


def test_export_refusals_name_what_to_do(tmp_path: Path, capsys) -> None:
    source = checkpoint(tmp_path, "diff")
    assert main(["export", str(source), str(tmp_path / "a"), "--format", "hf"]) != 0
    assert "--tokenizer byte" in capsys.readouterr().err
    big = TokenizerFile(models.WordLevel({f"t{i}": i for i in range(300)}, unk_token="t0"))
    big.add_special_tokens(["</s>"])
    big.save(str(tmp_path / "big.json"))
    assert main(["export", str(source), str(tmp_path / "b"), "--format", "hf", "--tokenizer",
                 str(tmp_path / "big.json")]) != 0
    assert "model.vocab_size=257 is too small" in capsys.readouterr().err
    assert main(["export", str(source), str(tmp_path / "c"), "--format", "mixtral", "--tokenizer", "byte"]) != 0
    assert "--tokenizer is for --format moe-diff or hf" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", str(source), str(tmp_path / "full"), "--format", "hf", "--tokenizer", "byte"]) != 0
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left behind
