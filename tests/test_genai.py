"""ONNX Runtime GenAI runs a Yat decoder export's folder (yatdeploy.genai): `onnxruntime_genai.Model(folder)` loads
what `export --kv-cache` writes and its greedy generation is PyTorch's greedy full recompute, token for token, with
the custom-op library beside it and without (YatGemm as the ONNX function); the tokenizers it is given round-trip
text; what can't go in the folder is refused naming it.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from nmn.torch import MultiHeadYatAttention, YatEmbed, YatNMN
from torch import nn

import yatdeploy
from yatdeploy import demo_lm, genai, native
from yatdeploy.cli import main
from yatdeploy.errors import YatDeployError

pytestmark = pytest.mark.slow  # exports, then ONNX Runtime GenAI sessions

NEW_TOKENS = 40
TEXTS = ("The yat neuron, ok.\nA: x", "  two  spaces\n\n")


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = MultiHeadYatAttention(width, heads)
        self.mlp = YatNMN(width, width)

    def forward(self, x, mask):
        x = x + self.attention(self.n1(x), mask=mask)
        return x + self.mlp(self.n2(x))


class ByteGPT(nn.Module):
    """A 2-layer Yat GPT over bytes (a vocabulary of 260: 256 bytes and 4 more), several heads, the tied head."""

    def __init__(self, vocab=260, width=32, heads=4, layers=2, context=64, positions=True) -> None:
        super().__init__()
        self.tok = YatEmbed(vocab, width)
        self.pos = nn.Embedding(context, width) if positions else None
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=ids.device))
        mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()[None, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.tok.attend(self.norm(x))


def _byte_gpt(**options) -> nn.Module:
    torch.manual_seed(1)
    return ByteGPT(**options).eval()


def _demo_lm() -> nn.Module:
    torch.manual_seed(0)
    return demo_lm.build_lm_model().eval()


def torch_greedy(model: nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """PyTorch's greedy tokens, the whole sequence recomputed at each step."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def genai_greedy(folder, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The demo LM (its character tokenizer) and the byte GPT (--tokenizer bytes) exported with their KV cache and
    the library, each export's file also in a folder of its own written with ops "function"."""
    root = tmp_path_factory.mktemp("genai")
    chars = root / "chars-tokenizer.json"
    chars.write_text(json.dumps(genai.character_tokenizer(demo_lm.vocabulary()).content))
    made = {}
    for name, build, tokenizer in (("demo", _demo_lm, str(chars)), ("gpt", _byte_gpt, "bytes")):
        result = yatdeploy.export(build(), path=root / name / "library" / "model.onnx", kv_cache=True,
                                  tokenizer=tokenizer, validate=False)
        function = root / name / "function" / "model.onnx"
        function.parent.mkdir(parents=True)
        shutil.copyfile(result.path, function)
        genai.write_folder(function, result.decoder, tokenizer=genai.read_tokenizer(tokenizer), ops="function")
        made[name] = (build, result)
    return root, made


@pytest.mark.parametrize("ops", ["library", "function"])
@pytest.mark.parametrize("name, prompt", [("demo", demo_lm.encode("The yat ")), ("gpt", list(b"Yat \xe2\x9c\x93"))])
def test_genai_generates_pytorchs_greedy_tokens(exports, name, prompt, ops):
    root, made = exports
    build, result = made[name]
    folder = root / name / ops
    config = json.loads((folder / genai.GENAI_CONFIG).read_text())
    options = config["model"]["decoder"]["session_options"]
    if ops == "library":
        assert options["custom_ops_library"] == native.CPU_LIBRARY
        assert (folder / native.CPU_LIBRARY).is_file()
        assert any(p.name.startswith("libscipy_openblas") for p in folder.iterdir())  # what the library links
    else:
        assert "custom_ops_library" not in options and not list(folder.glob("*.so"))
    assert config["model"]["decoder"]["num_hidden_layers"] == result.decoder.layers
    assert genai_greedy(folder, prompt, NEW_TOKENS) == torch_greedy(build(), prompt, NEW_TOKENS)


def test_a_gpt_without_positions_and_with_the_last_logits_only_generates_the_same(tmp_path):
    model = _byte_gpt(positions=False)
    result = yatdeploy.export(model, path=tmp_path / "model.onnx", kv_cache=True, logits="last",
                              context_length=96, genai_ops="function", validate=False)
    inputs = json.loads((tmp_path / genai.GENAI_CONFIG).read_text())["model"]["decoder"]["inputs"]
    assert "position_ids" not in inputs and result.decoder.logits == "last"
    prompt = list("Yat".encode())
    assert genai_greedy(tmp_path, prompt, NEW_TOKENS) == torch_greedy(model, prompt, NEW_TOKENS)


def test_the_character_tokenizer_round_trips_the_demo_text(exports):
    root, _ = exports
    tokenizer = og.Tokenizer(og.Model(str(root / "demo" / "function")))
    for text in TEXTS:
        ids = [int(i) for i in tokenizer.encode(text)]
        assert ids == demo_lm.encode(text)
        assert tokenizer.decode(np.array(ids, np.int32)) == text


def test_the_byte_tokenizer_round_trips_any_utf8_text(exports):
    root, _ = exports
    tokenizer = og.Tokenizer(og.Model(str(root / "gpt" / "function")))
    for text in (*TEXTS, "héllo wörld — 日本語 🙂"):
        ids = [int(i) for i in tokenizer.encode(text)]
        assert ids == list(text.encode())
        assert tokenizer.decode(np.array(ids, np.int32)) == text
        stream = tokenizer.create_stream()
        assert "".join(stream.decode(i) for i in ids) == text  # token by token, as a generator streams


def test_a_tokenizer_file_is_copied_with_its_special_tokens(exports, tmp_path):
    _, made = exports
    _, result = made["demo"]
    source = tmp_path / "given"
    source.mkdir()
    content = genai.character_tokenizer(demo_lm.vocabulary()).content
    (source / "tokenizer.json").write_text(json.dumps(content))
    config = {"eos_token": "Ċ", "bos_token": {"content": "T"}}  # Ċ: the newline in the byte-level alphabet
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    target = tmp_path / "folder" / "model.onnx"
    target.parent.mkdir()
    shutil.copyfile(result.path, target)
    genai.write_folder(target, result.decoder, tokenizer=genai.read_tokenizer(source / "tokenizer.json"),
                       ops="function")
    model = json.loads((target.parent / genai.GENAI_CONFIG).read_text())["model"]
    newline = demo_lm.encode("\n")[0]
    assert (model["eos_token_id"], model["pad_token_id"], model["bos_token_id"]) == \
        (newline, newline, demo_lm.encode("T")[0])
    assert json.loads((target.parent / "tokenizer.json").read_text()) == content
    assert og.Tokenizer(og.Model(str(target.parent))).decode(np.array(demo_lm.encode("ab c"), np.int32)) == "ab c"


def _tokenizer_file(tmp_path, content, name="tokenizer.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ([1, 2], "is not a JSON object"),
    ({"model": {"type": "BPE"}}, "not a Hugging Face tokenizers file (no model.vocab)"),
    ({"model": {"type": "WordPiece", "vocab": {"a": 0}}},
     "a WordPiece tokenizer; ONNX Runtime GenAI 0.18 reads BPE and Unigram tokenizers only"),
    ({"model": {"type": "BPE", "vocab": ["a"]}}, "its BPE vocabulary is malformed"),
], ids=["bad-json", "not-an-object", "no-vocab", "wordpiece", "malformed"])
def test_a_tokenizer_that_genai_cant_read_is_refused_naming_the_problem(tmp_path, content, message):
    with pytest.raises(YatDeployError, match=re.escape(message)):
        genai.read_tokenizer(_tokenizer_file(tmp_path, content))


def test_a_special_token_the_tokenizer_lacks_is_refused(tmp_path):
    path = _tokenizer_file(tmp_path, genai.character_tokenizer("ab").content)
    _tokenizer_file(tmp_path, {"eos_token": "</s>"}, "tokenizer_config.json")
    with pytest.raises(YatDeployError, match="tokenizer_config.json's eos_token '</s>' is not a token"):
        genai.read_tokenizer(path)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(exports):
    _, made = exports
    _, result = made["demo"]
    with pytest.raises(YatDeployError, match="ids up to 255, but the model's vocabulary has 39 tokens"):
        genai.write_folder(result.path, result.decoder, tokenizer=genai.read_tokenizer("bytes"))


def test_a_character_tokenizer_takes_one_byte_characters_only():
    with pytest.raises(YatDeployError, match="characters of one UTF-8 byte"):
        genai.character_tokenizer(["a", "é"])


def test_the_genai_options_are_checked_before_the_model_loads(tmp_path, capsys):
    model = tmp_path / "absent.pt"  # never loaded: the options fail first
    assert main(["export", str(model), "--kv-cache", "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert f"--tokenizer {tmp_path / 'nope.json'}: no such file" in capsys.readouterr().err
    with pytest.raises(YatDeployError, match="tokenizer.*no such file"):
        yatdeploy.export(model, path=tmp_path / "m.onnx", kv_cache=True, tokenizer=tmp_path / "nope.json")
    with pytest.raises(YatDeployError, match="are for a decoder's ONNX Runtime GenAI folder: add kv_cache=True"):
        yatdeploy.export(model, (1, 4), tmp_path / "m.onnx", tokenizer="bytes")
    with pytest.raises(YatDeployError, match="genai_ops.*'kernel': one of library, function"):
        yatdeploy.export(model, path=tmp_path / "m.onnx", kv_cache=True, genai_ops="kernel")
