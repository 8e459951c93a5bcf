"""Every YAML in configs/ loads and validates; malformed configs fail with one line naming the problem."""

from pathlib import Path

import pytest
import yaml

from configs.schema import ConfigError, RunConfig, load_run_config

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "sweeps" not in p.parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_loads_and_opens_with_its_launch_command(path):
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    head = path.read_text().splitlines()[:3]
    assert head[0].startswith("# Launch:") and str(path.relative_to(ROOT)) in head[0]
    assert any(line.startswith("# Override:") and "--set" in line for line in head)
    assert (ROOT / cfg.deepspeed.config).is_file()


def test_gpu_configs_follow_the_yarn_recipe():
    cfg = load_run_config(ROOT / "configs/ntk_parts_32k.yaml")
    assert (cfg.model.name, cfg.rope.method, cfg.rope.factor, cfg.data.seq_len) == (
        "meta-llama/Llama-2-7b-hf", "ntk_by_parts", 8.0, 32768)
    t = cfg.train
    assert (t.lr, t.betas, t.weight_decay, t.warmup_steps, t.schedule, t.grad_clip) == (
        2e-5, (0.9, 0.95), 0.0, 20, "constant", 1.0)
    assert t.micro_batch_size * t.grad_accum * 8 == 64  # the paper's global batch on 8 GPUs
    assert "zero3" in cfg.deepspeed.config


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BASE = """
model: {name: tiny-llama}
rope: {method: yarn, factor: 2.0}
data: {seq_len: 512}
output: {dir: runs/x}
"""


@pytest.mark.parametrize("text,message", [
    (BASE.replace("seq_len", "seqlen"), "unknown config key 'data.seqlen'; did you mean 'data.seq_len'?"),
    (BASE + "trian: {max_steps: 3}\n", "unknown config key 'trian'; did you mean 'train'?"),
    (BASE.replace("method: yarn", "method: yarm"), "unknown RoPE method 'yarm'"),
    (BASE.replace("factor: 2.0", "factor: 0.5"), "factor"),
    (BASE.replace("model: {name: tiny-llama}\n", ""), "missing config key 'model'"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_malformed_config_fails_with_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(_write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_are_typed_and_checked(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_run_config(path, ["train.max_steps=7", "rope.factor=4", "lora.target_modules=[q_proj]"])
    assert (cfg.train.max_steps, cfg.rope.factor, cfg.lora.target_modules) == (7, 4.0, ["q_proj"])
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_run_config(path, ["train.max_step=7"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_run_config(path, ["train.max_steps"])


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            for sub in getattr(field.annotation, "__args__", (field.annotation,)):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub)
    walk(RunConfig)


def test_yaml_mirrors_the_schema_sections():
    raw = yaml.safe_load((ROOT / "configs/ntk_parts_32k.yaml").read_text())
    assert list(raw) == [k for k in RunConfig.model_fields if k in raw]
