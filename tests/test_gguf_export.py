"""GGUF export: written with the `gguf` package, read back through transformers' own GGUF loader.

Tiny random models of each family (built as conftest does, float32). F32 files must give the same
next-token logits as the model; quantized ones the same as the model rounded the way the file stores
it (`as_stored`), so the loader is shown to read exactly what was written and the quantisation error
is measured apart.
"""

from __future__ import annotations

import copy
import json
import logging
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from conftest import PROMPTS, _corpus, build_model, build_tokenizer
from pipeline import gguf_export as ge
from pipeline.errors import ConfigError
from pipeline.models.adapters import get_adapter

TEXTS = ["Give three tips for staying healthy.", "  two leading spaces", "Ünïcödé and emoji 😀!", "a\nb\n\nc",
         "<|im_start|>user\nHi<|im_end|>"]


@cache
def _tokenizer(name: str) -> PreTrainedTokenizerFast:
    return build_tokenizer(name)


def _model(name: str, tie: bool = False, vocab: int | None = None):
    return build_model(name, vocab or len(_tokenizer(name)), n_layers=2, tie=tie).eval()


def _ids(tokenizer) -> torch.Tensor:
    """Four prompts of 8 tokens (no padding needed), ending at different tokens."""
    return torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"][:8] for p in PROMPTS[:4]])


@torch.no_grad()
def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits[:, -1].float()


def _roundtrip(model, tokenizer, path: Path, qtype: str):
    summary = ge.write_from_model(model, tokenizer, path, qtype)
    back, back_tokenizer = ge.load_back(path)
    return summary, back, back_tokenizer


def _same_tokenization(a, b, texts=TEXTS) -> None:
    for text in texts:
        for special in (False, True):
            ids = [t(text, add_special_tokens=special)["input_ids"] for t in (a, b)]
            assert ids[0] == ids[1], (text, special)


# ------------------------------------------------------------------------------------------------ tensors


def test_quantize_picks_storage_types_and_falls_back(caplog):
    torch.manual_seed(0)
    matrix = torch.randn(8, 64)
    assert ge.quantize(torch.randn(64), "Q8_0").dtype == np.float32  # norms/biases stay F32
    assert ge.stored_type((64,), "BF16") == GGMLQuantizationType.F32
    q8 = ge.quantize(matrix, "Q8_0")
    assert q8.dtype == np.uint8 and q8.shape == (8, 2 * 34)  # two 32-value blocks of 34 bytes per row
    assert torch.allclose(ge.dequantize_like_file(matrix, "Q8_0"), matrix, atol=matrix.abs().max() / 127)
    bf16 = matrix.to(torch.bfloat16)
    assert torch.equal(ge.dequantize_like_file(bf16, "BF16"), bf16.float())  # bfloat16 is exact in BF16
    assert ge.quantize(matrix, "F16").dtype == np.float16
    with caplog.at_level(logging.WARNING):
        odd = ge.quantize(torch.randn(4, 48), "Q8_0")  # 48 is not a whole number of 32-value blocks
    assert odd.dtype == np.float16 and "stored as F16" in caplog.text
    with pytest.raises(ConfigError, match="Q4_K"):
        ge.quantize(matrix, "Q4_K")


def test_qk_permutation_is_inverted_by_transformers_loader():
    """llama files interleave q/k rows per head; transformers' loader must give the HF rows back exactly."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    q, k, k_bias = torch.randn(64, 48), torch.randn(32, 48), torch.randn(32)
    for name, tensor, heads in (("blk.0.attn_q.weight", q, 4), ("blk.0.attn_k.weight", k, 2),
                                ("blk.0.attn_k.bias", k_bias, 2)):
        stored = ge.permute_qk(tensor, heads)
        assert not torch.equal(stored, tensor)
        back = processor.process(stored.numpy(), name).weights
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(back)), tensor), name


# ------------------------------------------------------------------------------------------------ hub models


@pytest.mark.parametrize(("name", "tie"), [("qwen2", False), ("qwen2", True), ("llama3", False), ("mistral", True)])
def test_write_from_model_f32_round_trips_exactly(tmp_path, name, tie):
    tokenizer, model = _tokenizer(name), _model(name, tie)
    _tokenizer("gemma").save_pretrained(tmp_path)  # another tokenizer next to the file must not be read
    summary, back, back_tokenizer = _roundtrip(model, tokenizer, tmp_path / f"{name}.gguf", "F32")
    assert summary["architecture"] == {"qwen2": "qwen2"}.get(name, "llama")
    names = {t.name for t in GGUFReader(tmp_path / f"{name}.gguf").tensors}
    assert summary["tied_embeddings"] is tie and ("output.weight" in names) is not tie
    assert back.config.tie_word_embeddings is tie
    ids = _ids(tokenizer)
    reference, loaded = _last_logits(model, ids), _last_logits(back, ids)
    torch.testing.assert_close(loaded, reference, atol=1e-5, rtol=0)
    assert ge.compare_next_token(reference, loaded) == {"mean_kl": pytest.approx(0, abs=1e-10), "top1_agreement": 1.0}
    _same_tokenization(tokenizer, back_tokenizer)
    assert back_tokenizer.chat_template == tokenizer.chat_template
    for attr in ("bos_token", "eos_token", "pad_token"):
        assert getattr(back_tokenizer, attr) == getattr(tokenizer, attr), attr


def test_byte_level_tokenizer_that_adds_bos_round_trips(tmp_path):
    """Llama-3 style: the post-processor prepends <|begin_of_text|>; the GGUF says add_bos_token."""
    tokenizer = copy.deepcopy(_tokenizer("llama3"))
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    assert tokenizer("hi")["input_ids"][0] == bos
    _, _, back_tokenizer = _roundtrip(_model("llama3"), tokenizer, tmp_path / "bos.gguf", "F32")
    _same_tokenization(tokenizer, back_tokenizer)


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2/Mistral-style tokenizer: BPE over ``▁``-prefixed words, byte fallback, <s> prepended."""
    trainer = Tokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=500, show_progress=False))
    trained = json.loads(trainer.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
    tokenizer = _sentencepiece_tokenizer()
    assert "<0xF0>" in tokenizer.tokenize("😀")  # byte fallback is exercised
    model = _model("llama2", vocab=len(tokenizer))
    _, back, back_tokenizer = _roundtrip(model, tokenizer, tmp_path / "spm.gguf", "F32")
    meta = GGUFReader(tmp_path / "spm.gguf").fields
    assert meta["tokenizer.ggml.model"].contents() == "llama" and meta["tokenizer.ggml.add_bos_token"].contents()
    types = meta["tokenizer.ggml.token_type"].contents()
    assert types[0] == 2 and types[1] == 3 and set(types[3:259]) == {6}  # unknown, control, 256 byte tokens
    _same_tokenization(tokenizer, back_tokenizer)
    ids = _ids(tokenizer)
    torch.testing.assert_close(_last_logits(back, ids), _last_logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "qtype", "max_kl"),
                         [("qwen2", "F16", 1e-4), ("qwen2", "BF16", 1e-3), ("qwen2", "Q8_0", 1e-2),
                          ("llama3", "Q8_0", 1e-2)])
def test_quantized_files_load_back_as_their_own_dequantized_weights(tmp_path, name, qtype, max_kl):
    tokenizer, model = _tokenizer(name), _model(name)
    summary, back, _ = _roundtrip(model, tokenizer, tmp_path / f"{qtype}.gguf", qtype)
    assert set(summary["types"]) == {qtype, "F32"} and not summary["fallbacks"]
    stored = copy.deepcopy(model)
    ge.as_stored(stored, qtype)
    ids = _ids(tokenizer)
    reference, rounded, loaded = _last_logits(model, ids), _last_logits(stored, ids), _last_logits(back, ids)
    total = ge.compare_next_token(reference, loaded)
    assert 0 < total["mean_kl"] < max_kl and total["top1_agreement"] == 1.0  # quantisation error, small
    torch.testing.assert_close(loaded, rounded, atol=1e-5, rtol=0)  # the loader reads exactly what was written
    assert ge.compare_next_token(rounded, loaded)["mean_kl"] < 1e-10


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    tokenizer = _tokenizer("llama3")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    summary, back, _ = _roundtrip(model, tokenizer, tmp_path / "rope.gguf", "F32")
    assert summary["rope_freqs"] and ge.ROPE_FREQS in {t.name for t in GGUFReader(tmp_path / "rope.gguf").tensors}
    torch.testing.assert_close(back.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    ids = torch.tensor([sum((tokenizer(p)["input_ids"] for p in PROMPTS), [])])  # long enough for every frequency
    torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_gemma_is_written_in_llama_cpp_layout(tmp_path):
    """transformers cannot read `gemma` GGUF files back, so check the layout llama.cpp expects directly."""
    tokenizer, model = _tokenizer("gemma"), _model("gemma", tie=True)
    path = tmp_path / "gemma.gguf"
    summary = ge.write_from_model(model, tokenizer, path, "F32")
    reader = GGUFReader(path)
    tensors = {t.name: torch.from_numpy(np.array(t.data)).reshape(ge._shape(t)) for t in reader.tensors}
    assert summary["architecture"] == "gemma" and "output.weight" not in tensors  # llama.cpp's gemma is tied
    assert reader.fields["gemma.attention.key_length"].contents() == 16
    state = model.state_dict()
    torch.testing.assert_close(tensors["blk.1.attn_norm.weight"], state["model.layers.1.input_layernorm.weight"] + 1)
    torch.testing.assert_close(tensors["output_norm.weight"], state["model.norm.weight"] + 1)
    assert torch.equal(tensors["blk.0.attn_q.weight"], state["model.layers.0.self_attn.q_proj.weight"])  # no permute
    assert torch.equal(tensors["token_embd.weight"], state["model.embed_tokens.weight"])
    with pytest.raises(ConfigError, match="gemma"):
        ge.load_back(path)
    untied = _model("gemma", tie=False)
    with pytest.raises(ConfigError, match="output.weight"):
        ge.write_from_model(untied, tokenizer, tmp_path / "untied.gguf", "F32")
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.detach().clone())  # equal: tied
    assert ge.write_from_model(untied, tokenizer, tmp_path / "equal.gguf", "F32")["tied_embeddings"]


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen"])
def test_other_architectures_are_refused(tmp_path, name):
    with pytest.raises(ConfigError) as error:
        ge.write_from_model(_model(name), _tokenizer(name), tmp_path / "x.gguf", "F32")
    assert all(arch in str(error.value) for arch in ("Llama", "Mistral", "Qwen2", "Gemma"))
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------------ from a GGUF


@torch.no_grad()
def _fold_ablation(model, adapter, direction: torch.Tensor) -> None:
    """Project a direction out of every residual-stream writer (untying a tied unembedding first)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out.weight is inp.weight:
        out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    u = direction / direction.norm()
    inp.weight.copy_(inp.weight - (inp.weight @ u)[:, None] * u)
    for block in adapter.blocks(model):
        for linear in adapter.output_projections(block):
            linear.weight.copy_(linear.weight - u[:, None] * (u @ linear.weight)[None, :])


@pytest.mark.parametrize(("name", "tie", "qtype"), [("qwen2", False, "F32"), ("qwen2", True, "Q8_0"),
                                                     ("llama3", True, "F16")])
def test_write_from_source_replaces_only_the_edited_tensors(tmp_path, name, tie, qtype):
    tokenizer = _tokenizer(name)
    source = tmp_path / "source.gguf"
    ge.write_from_model(_model(name, tie), tokenizer, source, "Q8_0")  # a quantized source, like the embedded ones
    edited, _ = ge.load_back(source)  # what the pipeline runs: the source, dequantized
    adapter = get_adapter("qwen2" if name == "qwen2" else "llama3")
    names = ge.edited_parameter_names(edited, adapter)
    assert len(names) == 1 + 2 * 2 and names[0].endswith("embed_tokens.weight")
    torch.manual_seed(1)
    _fold_ablation(edited, adapter, torch.randn(64))

    out = tmp_path / "edited.gguf"
    summary = ge.write_from_source(source, edited.state_dict(), names, out, qtype)
    back, back_tokenizer = ge.load_back(out)

    replaced = {"token_embd.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.1.attn_output.weight",
                "blk.1.ffn_down.weight"}
    assert summary["replaced"] == dict.fromkeys(replaced, qtype) | ({"output.weight": "Q8_0"} if tie else {})
    assert summary["output_weight_added"] == ("source token_embd.weight bytes" if tie else None)
    src, new = GGUFReader(source), GGUFReader(out)
    src_tensors, new_tensors = {t.name: t for t in src.tensors}, {t.name: t for t in new.tensors}
    for tensor_name, tensor in new_tensors.items():
        if tensor_name in replaced:
            assert tensor.tensor_type == ge.QUANT_TYPES[qtype]
        else:  # untouched: the source's bytes; an added output.weight is the source's embedding
            original = src_tensors["token_embd.weight" if tensor_name not in src_tensors else tensor_name]
            assert tensor.tensor_type == original.tensor_type and tensor.data.tobytes() == original.data.tobytes()
    src_fields = {k: f.contents() for k, f in src.fields.items() if not k.startswith("GGUF.")}
    assert {k: f.contents() for k, f in new.fields.items() if not k.startswith("GGUF.")} == src_fields
    assert "tokenizer.chat_template" in src_fields and "tokenizer.ggml.tokens" in src_fields
    _same_tokenization(tokenizer, back_tokenizer)
    assert back.config.tie_word_embeddings is False

    ids = _ids(tokenizer)
    stored = copy.deepcopy(edited)
    ge.as_stored(stored, qtype, names)
    reference, rounded, loaded = _last_logits(edited, ids), _last_logits(stored, ids), _last_logits(back, ids)
    torch.testing.assert_close(loaded, rounded, atol=1e-5, rtol=0)  # exactly the edit, as stored
    assert ge.compare_next_token(reference, loaded)["mean_kl"] < (1e-10 if qtype == "F32" else 1e-2)


def test_write_from_source_rejects_a_state_that_does_not_fit(tmp_path):
    source = tmp_path / "source.gguf"
    ge.write_from_model(_model("qwen2"), _tokenizer("qwen2"), source, "F32")
    state = _model("qwen2").state_dict()
    with pytest.raises(ConfigError, match="not in the given state"):
        ge.write_from_source(source, state, ["model.layers.9.mlp.down_proj.weight"], tmp_path / "a.gguf", "F32")
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ConfigError, match="shape"):
        ge.write_from_source(source, state, ["model.layers.0.mlp.down_proj.weight"], tmp_path / "b.gguf", "F32")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()
