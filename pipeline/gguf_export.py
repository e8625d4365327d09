"""Write an edited model as a GGUF file (llama.cpp, Ollama, LM Studio), and read it back to check it.

Two writers, both with the `gguf` package:

* ``write_from_source``: the model came from a GGUF (the embedded defaults). Every metadata key
  (tokenizer and chat template included) and every tensor of the source file is copied byte for byte,
  except the tensors the edit changed, which are written from the edited weights in ``qtype``.
* ``write_from_model``: a hub model. The architecture and tokenizer metadata are built from the
  transformers config and tokenizer, for the architectures whose GGUF layout is known here: Llama
  (and Mistral, which is ``llama`` in GGUF), Qwen2 and Gemma 1. Any other is refused.

Verification: ``load_back`` reads the file through transformers' own GGUF loader, and
``compare_next_token`` compares next-token distributions with a reference. ``as_stored`` rounds a
model's weights the way the file stores them, so a quantized file can be compared with its own
dequantized weights (quantisation error) apart from the edit.

llama.cpp's layout differs from transformers' in three ways that this module applies and
transformers' loader undoes: GGUF names (``blk.N.attn_output`` ...), the rows of the q/k projections
of ``llama`` files are interleaved per head (rotary pairs side by side), and Gemma's RMSNorm weights
are stored as ``1 + w``. Llama-3.1-style rope scaling is stored as per-frequency divisors in
``rope_freqs.weight``, which llama.cpp applies and transformers' loader ignores (``load_back`` applies
it).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.errors import ConfigError
from pipeline.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

QUANT_TYPES: dict[str, GGMLQuantizationType] = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
    "Q8_0": GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
              "Q8_0": LlamaFileType.MOSTLY_Q8_0}

# transformers model_type -> GGUF architecture. Mistral is plain `llama` to llama.cpp.
ARCHITECTURES: dict[str, MODEL_ARCH] = {
    "llama": MODEL_ARCH.LLAMA,
    "mistral": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
    "gemma": MODEL_ARCH.GEMMA,
}
SUPPORTED = "Llama, Mistral, Qwen2, Gemma (1)"
GGUF_ARCHES = {gguf.MODEL_ARCH_NAMES[a]: a for a in ARCHITECTURES.values()}  # "llama", "qwen2", "gemma"
ACTIVATIONS = {"llama": {"silu"}, "qwen2": {"silu"}, "gemma": {"gelu", "gelu_pytorch_tanh"}}
ROPE_FREQS = "rope_freqs.weight"


# ------------------------------------------------------------------------------------------------ types


def quant_type(qtype: str) -> GGMLQuantizationType:
    """The ggml type of a ``qtype`` name; a clear error for the ones this module does not write."""
    if qtype not in QUANT_TYPES:
        raise ConfigError(f"GGUF type {qtype!r} is not supported", f"use one of {sorted(QUANT_TYPES)}")
    return QUANT_TYPES[qtype]


def stored_type(shape: tuple[int, ...] | torch.Size, qtype: str) -> GGMLQuantizationType:
    """The type a tensor of ``shape`` is stored in when the file's type is ``qtype``.

    1-D tensors (norms, biases) stay F32 as llama.cpp expects; a block type needs rows that are a
    whole number of blocks, else the tensor falls back to F16 (as llama.cpp's own converter does).
    """
    wanted = quant_type(qtype)
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return GGMLQuantizationType.F16
    return wanted


def quantize(tensor: torch.Tensor, qtype: str) -> np.ndarray:
    """``tensor`` in the type ``stored_type`` picks for ``qtype``, as the bytes the file holds.

    Goes through float32 (bfloat16 has no numpy type; every source dtype is exact in float32).
    """
    ggml_type = stored_type(tuple(tensor.shape), qtype)
    if ggml_type != quant_type(qtype) and tensor.dim() >= 2:
        log.warning("%s tensor of shape %s: rows are not whole %s blocks, stored as %s", qtype, tuple(tensor.shape),
                    qtype, ggml_type.name)
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, ggml_type)


def dequantize_like_file(tensor: torch.Tensor, qtype: str) -> torch.Tensor:
    """The values a reader gets back for ``tensor`` written in ``qtype`` (float32)."""
    ggml_type = stored_type(tuple(tensor.shape), qtype)
    values = gguf.quants.dequantize(quantize(tensor, qtype), ggml_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tensor.shape)


@torch.no_grad()
def as_stored(model: PreTrainedModel, qtype: str, names: Iterable[str] | None = None) -> None:
    """Round ``model``'s parameters (all, or ``names``) in place to what a ``qtype`` GGUF stores.

    The reference for "the file is read back exactly": a file's logits should match this model's to
    float precision, and this model against the unrounded one is the quantisation error alone.
    """
    params = dict(model.named_parameters())
    for name in params if names is None else names:
        param = params[name]
        param.copy_(dequantize_like_file(param, qtype).to(param.dtype))


# ------------------------------------------------------------------------------------------------ names


def gguf_architecture(model_type: str) -> MODEL_ARCH:
    """The GGUF architecture of a transformers ``model_type``; refuses the ones not handled here."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"no GGUF export for model type {model_type!r}",
                          f"GGUF export supports {SUPPORTED}; export this model with save_pretrained instead")
    return ARCHITECTURES[model_type]


def _file_architecture(name: str) -> MODEL_ARCH:
    if name not in GGUF_ARCHES:
        raise ConfigError(f"no GGUF export for a source GGUF of architecture {name!r}",
                          f"GGUF export supports {SUPPORTED}; export this model with save_pretrained instead")
    return GGUF_ARCHES[name]


def gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    """The GGUF tensor name of an HF parameter name (``model.layers.3.mlp.down_proj.weight`` ->
    ``blk.3.ffn_down.weight``), from the gguf package's own name tables."""
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ConfigError(f"parameter {hf_name} has no GGUF tensor name",
                          f"GGUF export supports the standard layouts of {SUPPORTED} only")
    return mapped


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a q/k projection's rows (or bias) from transformers' rotary layout to llama.cpp's.

    transformers rotates dimension ``i`` with ``i + head_dim/2`` in each head; llama.cpp rotates
    adjacent pairs ``(2i, 2i+1)``, so llama-architecture GGUF files store the rows interleaved.
    Inverse of transformers' ``LlamaTensorProcessor._reverse_permute_weights``, which reads rows as
    ``[head, half, pair]`` and swaps the last two; here ``[head, pair, half]`` -> ``[head, half, pair]``.
    """
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class Layout:
    """What it takes to turn HF tensors into one GGUF architecture's: names, q/k order, norm offset."""

    arch: MODEL_ARCH
    n_blocks: int
    n_heads: int
    n_kv_heads: int

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @cached_property
    def name_map(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.arch, self.n_blocks)

    def convert(self, hf_name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """``(gguf name, tensor as the file stores it)`` for one HF parameter."""
        name = gguf_name(self.name_map, hf_name)
        if self.arch == MODEL_ARCH.LLAMA and ".attn_q." in name:
            tensor = permute_qk(tensor, self.n_heads)
        elif self.arch == MODEL_ARCH.LLAMA and ".attn_k." in name:
            tensor = permute_qk(tensor, self.n_kv_heads)
        elif self.arch == MODEL_ARCH.GEMMA and name.endswith("norm.weight"):
            tensor = tensor.float() + 1  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by the stored weight
        return name, tensor


def _model_layout(model: PreTrainedModel) -> Layout:
    config = model.config
    heads = config.num_attention_heads
    return Layout(gguf_architecture(config.model_type), config.num_hidden_layers, heads,
                  getattr(config, "num_key_value_heads", None) or heads)


def edited_parameter_names(model: PreTrainedModel, adapter) -> list[str]:
    """The HF names of the parameters a folded ablation rewrites (``edited`` for ``write_from_source``):
    the embedding, and each block's residual-stream output projections with their biases."""
    modules = [adapter.embedding(model)] + [m for b in adapter.blocks(model) for m in adapter.output_projections(b)]
    targets = {id(t) for m in modules for t in (m.weight, getattr(m, "bias", None)) if t is not None}
    return [n for n, p in model.named_parameters() if id(p) in targets]


# ------------------------------------------------------------------------------------------------ writing


@dataclass
class _Tensor:
    """One tensor to write: its type, shape (torch order) and a callable giving its bytes when written."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]
    converted: bool = False  # written from weights in the file's qtype, not copied

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.ggml_type)


def _converted(name: str, tensor: torch.Tensor, qtype: str) -> _Tensor:
    return _Tensor(name, stored_type(tuple(tensor.shape), qtype), tuple(tensor.shape),
                   lambda: quantize(tensor, qtype), converted=True)


def _write(out: Path, arch_name: str, metadata: Iterable[tuple[str, object, GGUFValueType, GGUFValueType | None]],
           tensors: list[_Tensor], alignment: int | None = None) -> tuple[int, str]:
    """Write a GGUF atomically, tensors streamed one at a time (only one is ever quantized in memory).

    Returns the file's size and sha256.
    """
    with atomic_path(out) as tmp:
        writer = GGUFWriter(tmp, arch_name)
        if alignment is not None:
            writer.data_alignment = alignment
        for key, value, vtype, sub_type in metadata:
            writer.add_key_value(key, value, vtype, sub_type)
        for t in tensors:
            writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), int(np.prod(t.byte_shape)),
                                   raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = t.data()
            if data.nbytes != int(np.prod(t.byte_shape)):
                raise ValueError(f"{t.name}: {data.nbytes} bytes where {t.ggml_type.name} {t.shape} needs "
                                 f"{int(np.prod(t.byte_shape))}")
            writer.write_tensor_data(data)
        writer.close()
        size, digest = tmp.stat().st_size, sha256_file(tmp)
    return size, digest


def _summary(out: Path, qtype: str, arch_name: str, tensors: list[_Tensor], size: int, digest: str,
             **extra) -> dict:
    """What was written: tensor counts by type, the 2-D tensors that could not take ``qtype``, size, sha256."""
    return {"path": str(out), "qtype": qtype, "architecture": arch_name, "n_tensors": len(tensors),
            "types": dict(sorted(Counter(t.ggml_type.name for t in tensors).items())),
            "fallbacks": {t.name: t.ggml_type.name for t in tensors
                          if t.converted and len(t.shape) >= 2 and t.ggml_type != QUANT_TYPES[qtype]},
            "bytes": size, "sha256": digest, **extra}


# ------------------------------------------------------------------------------------------------ from a GGUF


def _field_value(field: gguf.ReaderField) -> tuple[object, GGUFValueType, GGUFValueType | None]:
    """A metadata value as the writer takes it back; strings stay bytes so nothing is re-encoded."""
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        sub_type = field.types[-1]
        if sub_type == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], vtype, sub_type
        return [field.parts[i].tolist()[0] for i in field.data], vtype, sub_type
    if vtype == GGUFValueType.STRING:
        return bytes(field.parts[-1]), vtype, None
    return field.parts[-1].tolist()[0], vtype, None


def _source_metadata(reader: GGUFReader) -> Iterator[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:  # header fields; the writer adds these
            continue
        yield (key, *_field_value(field))


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """A file tensor's shape in torch order (GGUF lists dimensions fastest-moving first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _raw(tensor: gguf.ReaderTensor, name: str | None = None) -> _Tensor:
    """A source tensor copied as is: same type, same bytes."""
    return _Tensor(name or tensor.name, tensor.tensor_type, _shape(tensor), lambda: tensor.data)


def _dequantized(tensor: gguf.ReaderTensor) -> torch.Tensor:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(_shape(tensor))


def _source_layout(reader: GGUFReader) -> Layout:
    arch_name = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    arch = _file_architecture(arch_name)

    def value(key: str) -> int:
        return int(reader.fields[key.format(arch=arch_name)].contents())

    heads = value(gguf.Keys.Attention.HEAD_COUNT)
    kv_key = gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch_name)
    kv_heads = int(reader.fields[kv_key].contents()) if kv_key in reader.fields else heads
    return Layout(arch, value(gguf.Keys.LLM.BLOCK_COUNT), heads, kv_heads)


def write_from_source(source_gguf: Path, state: dict[str, torch.Tensor], edited: Iterable[str], out: Path,
                      qtype: str) -> dict:
    """Copy ``source_gguf`` to ``out`` with the ``edited`` HF parameters replaced from ``state``, in ``qtype``.

    Everything else, metadata (tokenizer and chat template included) and tensors, is copied byte for
    byte, so the file differs from its source only where the edit does. A source that ties the
    unembedding to the embedding (no ``output.weight``) gets one when ``state``'s ``lm_head.weight``
    no longer equals its embedding (the edit untied them): the source's own embedding bytes when
    ``lm_head`` is still those values, else ``lm_head`` in ``qtype``.
    """
    quant_type(qtype)
    edited = list(edited)
    source_gguf, out = Path(source_gguf), Path(out)
    reader = GGUFReader(source_gguf)
    layout = _source_layout(reader)
    by_name = {t.name: t for t in reader.tensors}

    replaced: dict[str, torch.Tensor] = {}
    for hf_name in edited:
        if hf_name not in state:
            raise ConfigError(f"edited parameter {hf_name} is not in the given state", "pass the edited state_dict")
        name, tensor = layout.convert(hf_name, state[hf_name])
        if name not in by_name and name != "output.weight":
            raise ConfigError(f"{source_gguf.name} has no tensor {name} (for {hf_name})",
                              "pass the GGUF the edited model was loaded from")
        replaced[name] = tensor

    tensors = []
    for t in reader.tensors:
        if t.name not in replaced:
            tensors.append(_raw(t))
            continue
        new, expected = replaced.pop(t.name), _shape(t)
        if tuple(new.shape) != expected:
            raise ConfigError(f"edited {t.name} has shape {tuple(new.shape)}, the source's is {expected}",
                              "pass the GGUF the edited model was loaded from")
        tensors.append(_converted(t.name, new, qtype))

    head = replaced.pop("output.weight", None)
    if head is None and "output.weight" not in by_name and "lm_head.weight" in state:
        embedding = next((v for k, v in state.items() if k.endswith("embed_tokens.weight")), None)
        if embedding is None or not torch.equal(state["lm_head.weight"], embedding):
            head = state["lm_head.weight"]
    added = None
    if head is not None:
        if layout.arch == MODEL_ARCH.GEMMA:
            raise ConfigError("llama.cpp's gemma architecture has no separate output.weight, so an untied "
                              "unembedding cannot be written", "export this edit with save_pretrained")
        source_embedding = by_name["token_embd.weight"]
        if torch.equal(head, _dequantized(source_embedding).to(head.dtype)):  # lossless: reuse the bytes
            tensors.append(_raw(source_embedding, name="output.weight"))
            added = "source token_embd.weight bytes"
        else:
            tensors.append(_converted("output.weight", head, qtype))
            added = f"lm_head.weight in {qtype}"

    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    size, digest = _write(out, layout.arch_name, _source_metadata(reader), tensors,
                          alignment=int(alignment.contents()) if alignment is not None else None)
    replaced_names = {gguf_name(layout.name_map, e) for e in edited} | ({"output.weight"} if added else set())
    return _summary(out, qtype, layout.arch_name, tensors, size, digest, source=str(source_gguf),
                    replaced={t.name: t.ggml_type.name for t in tensors if t.name in replaced_names},
                    output_weight_added=added)


# ------------------------------------------------------------------------------------------------ from a model


def _rope(config) -> tuple[float, dict]:
    """``(rope theta, rope parameters)``; transformers 5 keeps both in ``rope_parameters``."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ConfigError(f"{config.model_type} config has no rope theta", "set rope_theta in the model config")
    return float(theta), params


def _rope_freqs(model: PreTrainedModel, arch: MODEL_ARCH, head_dim: int) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` for a fixed rescaling of the rotary frequencies (Llama-3.1's ``llama3``,
    ``linear``): per-frequency divisors of the plain inverse frequencies, read off the model's own rotary
    embedding. ``None`` for plain rope; other scalings (yarn, dynamic, longrope) are refused."""
    theta, params = _rope(model.config)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return None
    if rope_type not in ("llama3", "linear") or arch != MODEL_ARCH.LLAMA:
        raise ConfigError(f"{model.config.model_type} with rope scaling {rope_type!r} is not exported to GGUF",
                          "GGUF export handles plain rope, and llama3/linear scaling on Llama models")
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None or getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ConfigError(f"rope scaling {rope_type!r} with an attention factor", "not representable in GGUF")
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (plain / rotary.original_inv_freq.double().cpu()).float()


def _check_model(model: PreTrainedModel, layout: Layout) -> None:
    """Refuse config features the GGUF layout (or transformers reading it back) cannot express."""
    config = model.config
    family = layout.arch_name
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in ACTIVATIONS[family]:
        raise ConfigError(f"{config.model_type} with activation {act!r}", f"{family} GGUF uses {ACTIVATIONS[family]}")
    biases = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    if layout.arch == MODEL_ARCH.LLAMA and biases:
        raise ConfigError(f"{config.model_type} with attention/MLP biases",
                          "llama-architecture GGUF read back by transformers drops them; not exported")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        log.warning("%s sliding_window=%s: llama.cpp's %s architecture attends to the full context",
                    config.model_type, config.sliding_window, family)


def _output_names(model: PreTrainedModel) -> set[str]:
    """State-dict names of the unembedding, apart from the embedding's own (skipped when tied)."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    storage = {embedding.data_ptr()} | ({head.weight.data_ptr()} if head is not None else set())
    own = next(n for n, p in model.named_parameters() if p is embedding)
    return {n for n, t in model.state_dict().items() if n != own and t.data_ptr() in storage}


def _tied(model: PreTrainedModel) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is None or out.weight.data_ptr() == inp.weight.data_ptr()


def write_from_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, qtype: str,
                     name: str | None = None) -> dict:
    """Write a transformers model (Llama, Mistral, Qwen2, Gemma 1) and its tokenizer as a GGUF file.

    Metadata: general (name, file type, quantization version), the architecture's hyperparameters,
    the tokenizer (vocabulary, types, merges or scores, special ids, chat template). 2-D weights are
    written in ``qtype``, 1-D ones in F32.
    """
    quant_type(qtype)
    out = Path(out)
    layout = _model_layout(model)
    _check_model(model, layout)
    config = model.config
    arch = layout.arch_name
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    vocab_size = model.get_input_embeddings().weight.shape[0]
    theta, _ = _rope(config)

    meta: list[tuple[str, object, GGUFValueType, GGUFValueType | None]] = []

    def add(key: str, value, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        meta.append((key.format(arch=arch), value, vtype, sub_type))

    K, U32, F32 = gguf.Keys, GGUFValueType.UINT32, GGUFValueType.FLOAT32
    add(K.General.TYPE, "model", GGUFValueType.STRING)
    # never the bare model type: transformers' loader reads a file named exactly "mistral" as a
    # `mistral` architecture, which it then has no tensor names for
    add(K.General.NAME, name or Path(str(config.name_or_path or "")).name or type(model).__name__,
        GGUFValueType.STRING)
    add(K.General.FILE_TYPE, int(FILE_TYPES[qtype]), U32)
    add(K.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, U32)
    add(K.LLM.CONTEXT_LENGTH, int(config.max_position_embeddings), U32)
    add(K.LLM.EMBEDDING_LENGTH, int(config.hidden_size), U32)
    add(K.LLM.BLOCK_COUNT, int(config.num_hidden_layers), U32)
    add(K.LLM.FEED_FORWARD_LENGTH, int(config.intermediate_size), U32)
    add(K.LLM.VOCAB_SIZE, int(vocab_size), U32)
    add(K.Attention.HEAD_COUNT, layout.n_heads, U32)
    add(K.Attention.HEAD_COUNT_KV, layout.n_kv_heads, U32)
    add(K.Attention.LAYERNORM_RMS_EPS, float(config.rms_norm_eps), F32)
    add(K.Attention.KEY_LENGTH, int(head_dim), U32)
    add(K.Attention.VALUE_LENGTH, int(head_dim), U32)
    add(K.Rope.DIMENSION_COUNT, int(head_dim), U32)
    add(K.Rope.FREQ_BASE, theta, F32)
    meta.extend(tokenizer_metadata(tokenizer, vocab_size))

    tied = _tied(model)
    if layout.arch == MODEL_ARCH.GEMMA and not tied:
        head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if not torch.equal(head, embedding):
            raise ConfigError("llama.cpp's gemma architecture has no separate output.weight, so an untied "
                              "unembedding cannot be written", "export with save_pretrained instead")
        tied = True
    tensors = []
    freqs = _rope_freqs(model, layout.arch, head_dim)
    if freqs is not None:
        tensors.append(_Tensor(ROPE_FREQS, GGMLQuantizationType.F32, tuple(freqs.shape), lambda: freqs.numpy()))
    skip = _output_names(model) if tied else set()  # llama.cpp reuses token_embd when output is absent
    for hf_name, param in model.state_dict().items():
        if hf_name not in skip:
            tensors.append(_converted(*layout.convert(hf_name, param), qtype))
    size, digest = _write(out, arch, meta, tensors)
    return _summary(out, qtype, arch, tensors, size, digest, tied_embeddings=tied, rope_freqs=freqs is not None)


# ------------------------------------------------------------------------------------------------ tokenizer


def _backend(tokenizer: PreTrainedTokenizerBase) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tokenizer).__name__} has no tokenizers backend",
                          "GGUF export needs a fast (tokenizers) tokenizer")
    return json.loads(backend.to_str())


def _components(node: dict | None, key: str) -> list[dict]:
    """A normalizer/pre-tokenizer and, for a Sequence, its members."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get(key, []) for c in _components(child, key)]
    return [node]


def _pre_tokenizer_name(pre: list[dict]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer: which split regex it uses."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    levels = [c for c in pre if c["type"] == "ByteLevel"]
    if any(c.get("add_prefix_space") for c in levels):
        raise ConfigError("byte-level tokenizer with add_prefix_space", "not representable in GGUF")
    splits = [c for c in pre if c["type"] == "Split"]
    if not splits and len(levels) == 1 and levels[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    if len(splits) == 1 and "Regex" in splits[0]["pattern"] and not any(c.get("use_regex") for c in levels):
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == splits[0]["pattern"]["Regex"]]
        for preferred in ("llama-bpe", "qwen2", "tekken", "gpt-4o"):  # the names llama.cpp's converter writes
            if preferred in names:
                return preferred
        if names:
            return names[0]
    raise ConfigError("the tokenizer's pre-tokenizer split is not one llama.cpp knows by name",
                      "GGUF export handles GPT-2, Llama-3, Qwen2 and Mistral (tekken) byte-level splits")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def tokenizer_metadata(tokenizer: PreTrainedTokenizerBase,
                       vocab_size: int) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """The ``tokenizer.*`` metadata of a BPE tokenizer, padded to the embedding's ``vocab_size`` rows.

    Byte-level BPE (Qwen2, Llama 3, Mistral tekken) is llama.cpp's ``gpt2`` model: tokens, types,
    merges and the pre-tokenizer's name. SentencePiece-style BPE (Llama 2, Mistral v0.3, Gemma: ``▁``
    for spaces, byte fallback) is its ``llama`` model: tokens, scores (merge rank) and types, and the
    merges too so that transformers rebuilds the exact tokenizer.
    """
    spec = _backend(tokenizer)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer model {model.get('type')!r} is not exported to GGUF",
                          "GGUF export handles BPE tokenizers (byte-level or SentencePiece-style)")
    pre = _components(spec.get("pre_tokenizer"), "pretokenizers")
    normalizers = _components(spec.get("normalizer"), "normalizers")
    byte_level = any(c["type"] == "ByteLevel" for c in pre)
    metaspace = [c for c in pre if c["type"] == "Metaspace"]
    spm = model.get("byte_fallback") or metaspace or any(
        c["type"] == "Replace" and c.get("content") == "▁" for c in normalizers)
    if not byte_level and not spm:
        raise ConfigError("tokenizer is neither byte-level nor SentencePiece-style BPE", "not representable in GGUF")

    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) and max(vocab.values()) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(vocab.values())}, the embedding {vocab_size} rows",
                          "resize the model's token embeddings to the tokenizer")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows no token maps to (llama.cpp's filler)
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        if spm and token == model.get("unk_token"):
            types[index] = int(TokenType.UNKNOWN)
        elif spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[index] = int(TokenType.BYTE)
        elif index in added:
            types[index] = int(TokenType.CONTROL if added[index]["special"] else TokenType.USER_DEFINED)
        else:
            types[index] = int(TokenType.NORMAL)
    merges = _merges(model)

    S, A = GGUFValueType.STRING, GGUFValueType.ARRAY
    K = gguf.Keys.Tokenizer
    meta: list[tuple[str, object, GGUFValueType, GGUFValueType | None]] = []
    if byte_level:
        meta += [(K.MODEL, "gpt2", S, None), (K.PRE, _pre_tokenizer_name(pre), S, None)]
        if any(c["type"] not in ("NFC",) for c in normalizers):
            log.warning("tokenizer normalizer %s is not carried into GGUF", spec.get("normalizer"))
    else:
        scores = [0.0] * vocab_size
        rank = {}
        for i, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), i)
        for token, index in vocab.items():
            if token in rank:
                scores[index] = -float(rank[token])
        prefix = any(c.get("prepend_scheme", "always") in ("always", "first") for c in metaspace) or any(
            c["type"] == "Prepend" for c in normalizers)
        meta += [(K.MODEL, "llama", S, None), (K.PRE, "default", S, None),
                 (K.SCORES, scores, A, GGUFValueType.FLOAT32), (K.ADD_PREFIX, bool(prefix), GGUFValueType.BOOL, None)]
    meta += [(K.LIST, tokens, A, S), (K.TOKEN_TYPE, types, A, GGUFValueType.INT32)]
    if merges:
        meta.append((K.MERGES, merges, A, S))
    for key, token_id in ((K.BOS_ID, tokenizer.bos_token_id), (K.EOS_ID, tokenizer.eos_token_id),
                          (K.PAD_ID, tokenizer.pad_token_id), (K.UNK_ID, tokenizer.unk_token_id)):
        if token_id is not None:
            meta.append((key, int(token_id), GGUFValueType.UINT32, None))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id
    adds_eos = tokenizer.eos_token_id is not None and len(probe) > len(bare) and probe[-1] == tokenizer.eos_token_id
    meta += [(K.ADD_BOS, bool(adds_bos), GGUFValueType.BOOL, None),
             (K.ADD_EOS, bool(adds_eos), GGUFValueType.BOOL, None)]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta.append((K.CHAT_TEMPLATE, template, S, None))
    return meta


# ------------------------------------------------------------------------------------------------ reading back


def load_back(path: Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` read from a GGUF by transformers' own loader (dequantized), in eval mode.

    The file is linked alone into a temporary directory, so configs or tokenizer files next to it
    cannot leak into what is read. A ``rope_freqs`` tensor (Llama-3.1-style rope scaling), which
    transformers' loader ignores, is applied to the rotary frequencies as llama.cpp does.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path).resolve()
    reader = GGUFReader(path)
    arch_name = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if arch_name not in GGUF_SUPPORTED_ARCHITECTURES and arch_name not in GGUF_CONFIG_ARCHS:
        raise ConfigError(f"transformers cannot read GGUF files of architecture {arch_name!r} back",
                          "check this file with llama.cpp instead (e.g. llama-perplexity or llama-cli)")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    freqs = _dequantized(freqs) if freqs is not None else None
    del reader
    with tempfile.TemporaryDirectory(prefix="gguf-load-") as tmp:
        os.symlink(path, Path(tmp) / path.name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True))
    if freqs is not None:
        rotary = model.get_decoder().rotary_emb
        rotary.inv_freq = rotary.inv_freq / freqs.to(rotary.inv_freq)
        rotary.original_inv_freq = rotary.inv_freq.clone()
    model.eval().requires_grad_(False)
    return model, tokenizer


def compare_next_token(reference_logits: torch.Tensor, other_logits: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference || other) of the next-token distributions, and how often their argmax agrees.

    Logits are ``[prompts, vocab]`` (the last position of each prompt).
    """
    ref = torch.log_softmax(reference_logits.double(), dim=-1)
    other = torch.log_softmax(other_logits.double(), dim=-1)
    kl = (ref.exp() * (ref - other)).sum(-1)
    return {"mean_kl": float(kl.mean()),
            "top1_agreement": float((reference_logits.argmax(-1) == other_logits.argmax(-1)).float().mean())}
