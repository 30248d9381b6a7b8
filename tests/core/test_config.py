import pytest

from btrm.config import Config, ConfigError, dump_yaml, load_config, parse_overrides


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
model: {name_or_path: some/model}
data:
  sources: [{path: a.jsonl, weight: 0.5}]
optim: {lr: 1.0e-5}
"""


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["--optim.lr=3e-6", "--train.max_steps", "7"])
    assert cfg.optim.lr == 3e-6  # CLI wins over YAML
    assert cfg.train.max_steps == 7
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # default kept
    assert cfg.data.sources[0].weight == 0.5 and cfg.data.sources[0].path == "a.jsonl"


def test_unknown_key_names_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(_write(tmp_path, BASE), ["--optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].wieght|unknown config key 'data.sources.wieght'"):
        load_config(_write(tmp_path, BASE.replace("weight", "wieght")))


@pytest.mark.parametrize("override, path", [
    ("--optim.lr=fast", "optim.lr"),
    ("--train.global_batch_pairs=2.5", "train.global_batch_pairs"),
    ("--deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("--data.overlong=cut", "data.overlong"),
    ("--model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
    ("--train.sequence_parallel_size=0", "train.sequence_parallel_size"),
])
def test_invalid_values_name_the_path(tmp_path, override, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        load_config(_write(tmp_path, BASE), [override])


def test_long_context_sequence_parallel_config_is_accepted(tmp_path):
    # world size and head counts are checked where they are known (btrm.distributed, btrm.sequence_parallel)
    cfg = load_config(_write(tmp_path, BASE), ["--data.max_length=131072", "--data.max_tokens=16384",
                                               "--train.sequence_parallel_size=8"])
    assert cfg.data.max_length == 131072 and cfg.train.sequence_parallel_size == 8


def test_dump_and_reload_is_equal(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["--data.chat_template_kwargs={date_string: 26 Jul 2024}",
                                               "--logging.tags=[a, b]"])
    p = tmp_path / "dump.yaml"
    dump_yaml(cfg, p)
    assert load_config(p) == cfg


def test_overrides_parse_yaml_values():
    tree = parse_overrides(["--data.sources=[{path: x.jsonl, swap: true}]", "--logging.wandb=false"])
    assert tree == {"data": {"sources": [{"path": "x.jsonl", "swap": True}]}, "logging": {"wandb": False}}
