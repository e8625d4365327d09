"""A minimal Qwen-1 stand-in: the module names and call structure of Qwen's remote code, nothing more.

Qwen-1 ships its modelling code in the hub repository (``trust_remote_code``), which tests cannot
fetch. What the adapter depends on is reproduced here: ``transformer.wte`` / ``h[i]`` / ``ln_f``,
blocks ``ln_1 -> attn (c_attn, c_proj) -> + residual -> ln_2 -> mlp (w1, w2, c_proj) -> + residual``
called with the hidden states as the first positional argument, and ``attn`` / blocks returning
tuples, as ``QWenBlock`` does. Registered with the Auto classes so ``load_model`` loads it like any
checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class QWenConfig(PretrainedConfig):
    model_type = "qwen"

    def __init__(
        self,
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.layer_norm_epsilon = intermediate_size, layer_norm_epsilon
        super().__init__(**kwargs)


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)  # Qwen: no_bias=True

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in self.c_attn(x).split(d, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, d)), None  # (output, present) like Qwen


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        half = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, half, bias=False)
        self.w2 = nn.Linear(config.hidden_size, half, bias=False)
        self.c_proj = nn.Linear(half, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, attention_mask=None):
        attn_output = self.attn(self.ln_1(hidden_states), attention_mask)[0]
        hidden_states = hidden_states + attn_output
        return (hidden_states + self.mlp(self.ln_2(hidden_states)),)


class QWenModel(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class QWenLMHeadModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["QWenBlock"]

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        t = input_ids.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        mask = mask | torch.eye(
            t, dtype=torch.bool, device=input_ids.device
        )  # padded rows attend to themselves
        hidden = self.transformer.wte(input_ids)
        for block in self.transformer.h:
            hidden = block(hidden, attention_mask=mask)[0]
        return CausalLMOutputWithPast(logits=self.lm_head(self.transformer.ln_f(hidden)))


AutoConfig.register("qwen", QWenConfig)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel)
