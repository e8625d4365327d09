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
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_post_instruction_tokens_are_the_template_suffix(tiny_lm, family):
    lm = tiny_lm(family)
    assert lm.chat.prefix_text == EXPECTED_PREFIX[family]
    assert lm.chat.suffix_text == EXPECTED_SUFFIX[family]
    assert lm.tokenizer.decode(list(lm.chat.suffix_ids)) == EXPECTED_SUFFIX[family]
    for prompt, ids in zip(PROMPTS, lm.encode(PROMPTS)):
        # every prompt ends with exactly the same post-instruction tokens, and decodes to the template
        assert tuple(ids[-lm.chat.n_post_instruction :]) == lm.chat.suffix_ids
        assert tuple(ids[: len(lm.chat.prefix_ids)]) == lm.chat.prefix_ids
        rendered = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True)
        assert lm.tokenizer.decode(ids) == rendered


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_system_prompt_goes_into_the_prefix(tiny_lm, family):
    lm = tiny_lm(family, system_prompt="Be brief.")
    assert "Be brief." in lm.chat.prefix_text
    assert lm.chat.suffix_text == EXPECTED_SUFFIX[family]


def test_family_without_system_role_rejects_a_system_prompt(tiny_lm):
    with pytest.raises(ConfigError, match="system"):
        tiny_lm("gemma", system_prompt="Be brief.")


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
