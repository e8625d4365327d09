"""Chat formatting: the model's own template, split around the user's instruction.

Rendering the template once with a placeholder instruction gives the text before it (system prompt,
user header) and after it (end of turn, assistant header). The tokens after the instruction are the
paper's *post-instruction positions*: identical for every prompt and the place where the model
decides whether to refuse. Every prompt is encoded as ``prefix_ids + body + suffix_ids``, where
``prefix_ids`` is shared by all prompts (so its key/value cache can be computed once) and
``suffix_ids`` are those post-instruction tokens.

Rendering a finished assistant turn the same way gives the template's end-of-turn token (e.g.
``<|im_end|>``, ``<end_of_turn>``), which some checkpoints (Gemma 1, Qwen 1) do not list as an
end-of-sequence token in their generation config; generation must stop there too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jinja2
from transformers import PreTrainedTokenizerBase

from pipeline.errors import ConfigError

PLACEHOLDER = "INSTRUCTION_PLACEHOLDER_7F3A"
RESPONSE_PLACEHOLDER = "RESPONSE_PLACEHOLDER_7F3A"
_MARKER = re.compile(r"<[^<>\s]+>|\[/?[A-Z_]+\]")  # <|im_end|>, <end_of_turn>, </s>, [/INST]
_PROBES = ("Hello there.", "Write a poem.", "1 + 1 = ?")


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    shortest = min(sequences, key=len)
    for i, token in enumerate(shortest):
        if any(seq[i] != token for seq in sequences):
            return shortest[:i]
    return list(shortest)


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, messages: list[dict], extra: dict) -> tuple[int, ...]:
    """The control token the template puts right after an assistant's reply (``<|im_end|>``), if any.

    A marker such as ``<end_of_turn>`` that the tokenizer encodes as one token is a control token;
    remote-code tokenizers (Qwen 1) do not list theirs as special tokens, so this does not ask.
    """
    turn = [*messages, {"role": "assistant", "content": RESPONSE_PLACEHOLDER}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False, **extra)
    except jinja2.TemplateError:  # a template that cannot render a finished turn has no such token
        return ()
    marker = _MARKER.match(text.split(RESPONSE_PLACEHOLDER)[-1].lstrip(" ")) if RESPONSE_PLACEHOLDER in text else None
    ids = tokenizer(marker.group(0), add_special_tokens=False).input_ids if marker else []
    return tuple(ids) if len(ids) == 1 else ()


@dataclass(frozen=True)
class ChatFormat:
    """A tokenizer plus the fixed text and tokens around every instruction."""

    tokenizer: PreTrainedTokenizerBase
    prefix_text: str
    suffix_text: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    end_of_turn_ids: tuple[int, ...] = field(default=())

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str | None = None,
        fallback_template: str | None = None,
        supports_system_prompt: bool = True,
        template_kwargs: Mapping | None = None,
    ) -> ChatFormat:
        """``template_kwargs`` pin template variables, e.g. Llama 3.1+'s ``date_string``, which the
        template otherwise takes from today's date (the prompt would change from day to day)."""
        if tokenizer.chat_template is None:
            if fallback_template is None:
                raise ConfigError(
                    "the tokenizer has no chat template and the model family defines none",
                    "set model.chat_template to the model's Jinja chat template",
                )
            tokenizer.chat_template = fallback_template
        if system_prompt is not None and not supports_system_prompt:
            raise ConfigError(
                "this model family has no system role",
                "set model.system_prompt to null (prepend any instructions to the prompt instead)",
            )
        messages = [{"role": "user", "content": PLACEHOLDER}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        extra = dict(template_kwargs or {})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        except jinja2.TemplateError as error:
            raise ConfigError(f"the chat template failed to render: {error}", "check model.system_prompt and "
                              "model.chat_template") from error
        if text.count(PLACEHOLDER) != 1:
            raise ConfigError("the chat template does not place the user message exactly once",
                              "set model.chat_template to a template that renders the user's content verbatim")
        prefix_text, suffix_text = text.split(PLACEHOLDER)
        if not suffix_text:
            raise ConfigError("the chat template puts nothing after the user's message (no assistant header)",
                              "use a chat template with add_generation_prompt support")

        def ids(s: str) -> list[int]:
            return tokenizer(s, add_special_tokens=False).input_ids

        heads = [ids(prefix_text + probe) for probe in _PROBES]
        prefix_ids = _common_prefix(heads)
        full = ids(prefix_text + _PROBES[0] + suffix_text)
        if full[: len(heads[0])] != heads[0]:
            raise ConfigError("the tokenizer merges the instruction's last token with the post-instruction text",
                              "set model.chat_template so the instruction is followed by a special token or space")
        suffix_ids = full[len(heads[0]):]
        return cls(tokenizer, prefix_text, suffix_text, tuple(prefix_ids), tuple(suffix_ids),
                   _end_of_turn(tokenizer, messages, extra))

    @property
    def n_post_instruction(self) -> int:
        return len(self.suffix_ids)

    def post_instruction_labels(self) -> list[str]:
        """Readable labels of the post-instruction tokens, e.g. ``['<|im_end|>', '\\n', ...]``."""
        return [self.tokenizer.decode([t]) for t in self.suffix_ids]

    def encode(self, instructions: list[str], suffix_ids: Sequence[int] = ()) -> list[list[int]]:
        """Token ids of each prompt: shared prefix, instruction, ``suffix_ids``, post-instruction tokens.

        ``suffix_ids`` (an adversarial suffix, say) are token ids appended after the instruction's own
        tokens, so a suffix found by token-level search is used exactly as found: re-tokenizing its text
        together with the instruction could merge tokens across the boundary.
        """
        heads = self.tokenizer([self.prefix_text + s for s in instructions], add_special_tokens=False).input_ids
        n = len(self.prefix_ids)
        out = []
        for instruction, head in zip(instructions, heads):
            if tuple(head[:n]) != self.prefix_ids:
                raise ConfigError(
                    f"the tokenizer merged the chat prefix into the instruction {instruction[:60]!r}",
                    "strip leading whitespace from instructions, or set model.chat_template",
                )
            out.append(head + list(suffix_ids) + list(self.suffix_ids))
        return out

    def encode_responses(self, instructions: list[str], responses: list[str]) -> list[tuple[list[int], int]]:
        """``(ids, n_prompt_tokens)`` for prompt + response, so a loss can be taken on the response only."""
        prompts = self.encode(instructions)
        bodies = self.tokenizer(responses, add_special_tokens=False).input_ids
        return [(p + b, len(p)) for p, b in zip(prompts, bodies)]
