"""One adapter per model family: the only place that knows module paths and family quirks.

Most chat models on the hub share the Llama layout (``model.model.layers[i].self_attn.o_proj`` and
``.mlp.down_proj``, pre-norm residual blocks), so the base class covers them and a family only
overrides what truly differs: where the blocks live, which modules write into the residual stream,
its refusal-start strings, a chat template for tokenizers that ship none, whether it has a system
role, and whether the directional ablation can be folded into the weights. Everything else (the
post-instruction tokens, the end-of-turn token, refusal token ids) is derived from the tokenizer.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pipeline.errors import ConfigError

ADAPTERS: dict[str, type[ModelAdapter]] = {}

# ChatML as Qwen-1 uses it (QwenLM/Qwen's make_context), without a default system turn: the paper
# prompts Qwen-1 with the user turn only.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta's Llama-2 chat format (the template HF later added to Llama-2-chat), for revisions without one.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def register(*families: str):
    """Class decorator: make an adapter available under one or more ``model.family`` names."""

    def wrap(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        for family in families:
            ADAPTERS[family] = cls
        cls.families = families
        return cls

    return wrap


def get_adapter(family: str) -> ModelAdapter:
    if family not in ADAPTERS:
        raise ConfigError(
            f"unknown model family {family!r}",
            f"set model.family to one of: {', '.join(sorted(ADAPTERS))}",
        )
    return ADAPTERS[family]()


class ModelAdapter:
    """Llama-style decoder: blocks at ``get_decoder().layers``, pre-norm, ``o_proj`` / ``down_proj`` writers."""

    families: ClassVar[tuple[str, ...]] = ()
    # First tokens of a refusal ("I cannot…", "As an AI…"); turned into ids through the tokenizer.
    refusal_strings: ClassVar[tuple[str, ...]] = ("I",)
    # Used only when the tokenizer has no chat template of its own.
    fallback_chat_template: ClassVar[str | None] = None
    supports_system_prompt: ClassVar[bool] = True

    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder; ``get_decoder`` also finds it inside multimodal wrappers (Gemma 3)."""
        return model.get_decoder()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return model.get_input_embeddings()

    def residual_writers(self, block: nn.Module) -> list[nn.Module]:
        """Modules whose output is added straight into the residual stream."""
        return [block.self_attn, block.mlp]

    def attention(self, block: nn.Module) -> nn.Module:
        """The self-attention module (its forward returns ``(output, attention probabilities or None)``)."""
        return block.self_attn

    def attention_output(self, block: nn.Module) -> nn.Linear:
        """The attention's output projection: its input is the heads' outputs, concatenated."""
        return block.self_attn.o_proj

    def output_projections(self, block: nn.Module) -> list[nn.Linear]:
        """Linear layers whose output rows live in the residual stream (for weight orthogonalization)."""
        return [block.self_attn.o_proj, block.mlp.down_proj]

    def orthogonalization_blocker(self) -> str | None:
        """Why weight orthogonalization cannot reproduce hook ablation for this family, or None."""
        return None


@register("llama", "llama3", "mistral", "yi", "smollm2")
class LlamaAdapter(ModelAdapter):
    """Llama 3.x, Mistral, Yi (ChatML in its tokenizer), SmolLM2: the base layout as is."""


@register("llama2")
class Llama2Adapter(ModelAdapter):
    """Older Llama-2-chat revisions ship no chat template."""

    fallback_chat_template = LLAMA2_TEMPLATE


@register("qwen2", "qwen2.5", "qwen3")
class Qwen2Adapter(ModelAdapter):
    refusal_strings = ("I", "As")


@register("gemma")
class GemmaAdapter(ModelAdapter):
    """Gemma 1: its chat template rejects a system turn."""

    supports_system_prompt = False


@register("gemma2")
class Gemma2Adapter(GemmaAdapter):
    """Gemma 2 normalises each sublayer's output before adding it to the residual stream.

    Its ``post_attention_layernorm`` / ``post_feedforward_layernorm`` are therefore the residual
    writers (in Llama, ``post_attention_layernorm`` is the pre-MLP norm and writes nothing).
    """

    def residual_writers(self, block: nn.Module) -> list[nn.Module]:
        return [block.post_attention_layernorm, block.post_feedforward_layernorm]

    def orthogonalization_blocker(self) -> str | None:
        return (
            "Gemma 2/3 apply an RMSNorm with learned scale after o_proj and down_proj, so removing the "
            "direction from those weights does not remove it from the residual stream"
        )


@register("gemma3")
class Gemma3Adapter(Gemma2Adapter):
    """Gemma 3: Gemma 2's post-norm blocks; its template folds a system prompt into the first user turn.

    The 4B-27B checkpoints are multimodal (``Gemma3ForConditionalGeneration``), with the text
    decoder at ``model.language_model``; ``get_decoder`` returns it, so the base paths hold.
    """

    supports_system_prompt = True


@register("qwen")
class QwenAdapter(ModelAdapter):
    """Qwen 1 (remote code): GPT-style module names and no chat template in the tokenizer."""

    refusal_strings = ("I", "As")
    fallback_chat_template = CHATML_TEMPLATE

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.transformer

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.transformer.ln_f

    def residual_writers(self, block: nn.Module) -> list[nn.Module]:
        return [block.attn, block.mlp]

    def output_projections(self, block: nn.Module) -> list[nn.Linear]:
        return [block.attn.c_proj, block.mlp.c_proj]
