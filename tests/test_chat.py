"""The chat template puts the post-instruction tokens where the paper reads the model's decision."""

import pytest
import torch

from conftest import FAMILIES, PROMPTS
from pipeline.errors import ConfigError

# family -> the text that follows the user's instruction in that family's real chat format
EXPECTED_SUFFIX = {
    "qwen2": "<|im_end|>\n<|im_start|>assistant\n",
    "smollm2": "<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": " [/INST]",
    "gemma": "<end_of_turn>\n<start_of_turn>model\n",
    "gemma2": "<end_of_turn>\n<start_of_turn>model\n",
    "gemma3": "<end_of_turn>\n<start_of_turn>model\n",
    "gemma3-mm": "<end_of_turn>\n<start_of_turn>model\n",
    "llama3.2": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[/INST]",
    "yi": "<|im_end|>\n<|im_start|>assistant\n",
    "qwen": "<|im_end|>\n<|im_start|>assistant\n",
}
EXPECTED_PREFIX = {
    "qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\n",
    "smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
               "<|im_start|>user\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    "llama2": "<s>[INST] ",
    "gemma": "<bos><start_of_turn>user\n",
    "gemma2": "<bos><start_of_turn>user\n",
    "gemma3": "<bos><start_of_turn>user\n",
    "gemma3-mm": "<bos><start_of_turn>user\n",
    "llama3.2": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
    "mistral": "<s>[INST] ",
    "yi": "<|im_start|>user\n",
    "qwen": "<|im_start|>user\n",  # the paper prompts Qwen 1 without a system turn
}
# end-of-turn token the template writes after a reply -> must stop generation (a checkpoint's own
# end-of-sequence token is often only <|endoftext|> / <eos>)
END_OF_TURN = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "llama3.2": "<|eot_id|>", "llama2": "</s>",
               "mistral": "</s>", "yi": "<|im_end|>", "smollm2": "<|im_end|>", "gemma": "<end_of_turn>",
               "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "gemma3-mm": "<end_of_turn>",
               "qwen": "<|im_end|>"}
PINNED_DATE = {"date_string": "26 Jul 2024"}


def _lm(tiny_lm, family, **overrides):
    """Llama 3.1+ configs pin the template's date, as conf/model does."""
    if family == "llama3.2":
        overrides.setdefault("chat_template_kwargs", PINNED_DATE)
    return tiny_lm(family, **overrides)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_post_instruction_tokens_are_the_template_suffix(tiny_lm, family):
    lm = _lm(tiny_lm, family)
    assert lm.chat.prefix_text == EXPECTED_PREFIX[family]
    assert lm.chat.suffix_text == EXPECTED_SUFFIX[family]
    assert lm.tokenizer.decode(list(lm.chat.suffix_ids)) == EXPECTED_SUFFIX[family]
    for prompt, ids in zip(PROMPTS, lm.encode(PROMPTS)):
        # every prompt ends with exactly the same post-instruction tokens, and decodes to the template
        assert tuple(ids[-lm.chat.n_post_instruction :]) == lm.chat.suffix_ids
        assert tuple(ids[: len(lm.chat.prefix_ids)]) == lm.chat.prefix_ids
        rendered = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True,
                                                    **(PINNED_DATE if family == "llama3.2" else {}))
        assert lm.tokenizer.decode(ids) == rendered


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_stops_at_the_templates_end_of_turn(tiny_lm, family):
    lm = _lm(tiny_lm, family)
    assert lm.tokenizer.convert_tokens_to_ids(END_OF_TURN[family]) in lm.eos_ids
    assert lm.tokenizer.eos_token_id in lm.eos_ids


@pytest.mark.parametrize("family", ["qwen2", "llama3", "llama3.2", "mistral", "yi", "gemma3", "gemma3-mm", "qwen"])
def test_system_prompt_goes_into_the_prefix(tiny_lm, family):
    lm = _lm(tiny_lm, family, system_prompt="Be brief.")
    assert "Be brief." in lm.chat.prefix_text
    assert lm.chat.suffix_text == EXPECTED_SUFFIX[family]


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_family_without_system_role_rejects_a_system_prompt(tiny_lm, family):
    with pytest.raises(ConfigError, match="system"):
        tiny_lm(family, system_prompt="Be brief.")


def test_unpinned_template_date_follows_the_calendar(tiny_lm):
    """Llama 3.1+ templates date the prompt with today's date unless the config pins date_string."""
    import datetime

    lm = tiny_lm("llama3.2")
    assert f"Today Date: {datetime.date.today():%d %b %Y}" in lm.chat.prefix_text


def test_missing_chat_template_is_a_clear_error(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from conftest import model_config
    from pipeline.models.loading import load_model

    path = tiny_dir("gemma")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = None
    target = tmp_path / "no-template"
    import shutil

    shutil.copytree(path, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(target)
    with pytest.raises(ConfigError, match="chat template"):
        load_model(model_config("gemma", target), device="cpu")


def test_refusal_tokens_come_from_the_tokenizer(tiny_lm):
    lm = tiny_lm("qwen2")
    expected = {lm.tokenizer("I", add_special_tokens=False).input_ids[0],
                lm.tokenizer("As", add_special_tokens=False).input_ids[0]}
    assert set(lm.refusal_ids) == expected
    lm = tiny_lm("llama3")
    assert lm.refusal_ids == [lm.tokenizer("I", add_special_tokens=False).input_ids[0]]
    assert torch.tensor(lm.refusal_ids).dtype == torch.long


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_refusal_tokens_of_every_family(tiny_lm, family):
    """"I" for every family, plus "As" for Qwen (1 and 2.x), as in the paper's code."""
    lm = _lm(tiny_lm, family)
    strings = ("I", "As") if family in ("qwen", "qwen2") else ("I",)
    assert lm.refusal_ids == sorted({lm.tokenizer(s, add_special_tokens=False).input_ids[0] for s in strings})
