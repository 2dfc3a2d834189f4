import pytest

from dist_ft.config import load_config
from dist_ft.config_reference import reference_markdown
from dist_ft.errors import UserError
from conftest import REPO


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_overrides_are_typed_and_nested(tmp_path):
    p = _write(tmp_path, "data: {train: x.jsonl}\ntrain: {lr: 1.0e-4}\n")
    cfg = load_config(p, ["train.lr=3e-5", "data.max_seq_len=512", "engine.zero_stage=2", "data.validation=v.jsonl"])
    assert cfg.train.lr == pytest.approx(3e-5) and cfg.data.max_seq_len == 512 and cfg.engine.zero_stage == 2
    assert cfg.data.train.path == "x.jsonl" and cfg.data.validation.path == "v.jsonl"


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = _write(tmp_path, "data: {train: x.jsonl}\ntrain: {learning_rat: 1}\n")
    with pytest.raises(UserError, match=r"c.yaml.*unknown config key 'train.learning_rat'"):
        load_config(p)
    with pytest.raises(UserError, match=r"unknown config key 'data.max_seqlen'; did you mean 'data.max_seq_len'\?"):
        load_config(None, ["data.train=x", "data.max_seqlen=5"])


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(UserError, match=r"config key 'train.lr': Input should be a valid number.*'fast'"):
        load_config(None, ["data.train=x", "train.lr=fast"])
    with pytest.raises(UserError, match=r"config key 'engine.zero_stage': Input should be 0, 1, 2 or 3"):
        load_config(None, ["data.train=x", "engine.zero_stage=4"])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match=r"c.yaml:2: invalid YAML"):
        load_config(_write(tmp_path, "data: {train: x}\n\tlr: 1\n"))
    with pytest.raises(UserError, match="needs engine.zero_stage >= 1"):
        load_config(None, ["data.train=x", "engine.offload_optimizer=true"])


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "README config reference is stale: paste `dist-ft config --reference` into it"


def test_every_field_is_documented():
    for line in reference_markdown().splitlines()[2:]:
        assert not line.rstrip().endswith("| None |"), line


def test_shipped_configs_validate():
    for p in sorted((REPO / "configs").glob("*.yaml")):
        head = p.read_text().splitlines()[0]
        assert head.startswith("# ") and ("dist-ft" in head or "deepspeed" in head or "sbatch" in head), f"{p.name}: first line must be its launch command"
        load_config(p)


def test_wandb_mode_is_offline_without_a_key_and_never_needs_network():
    from dist_ft.config import TrackConfig
    from dist_ft.track import wandb_mode

    auto = TrackConfig()
    assert wandb_mode(auto, {}) == "offline"
    assert wandb_mode(auto, {"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode(auto, {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode(auto, {"WANDB_MODE": "disabled"}) is None
    assert wandb_mode(TrackConfig(wandb=False), {"WANDB_API_KEY": "k"}) is None  # YAML `wandb: off`
    assert wandb_mode(TrackConfig(wandb="online"), {}) == "online"
