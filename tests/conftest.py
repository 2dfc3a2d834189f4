import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# token shards built on the fly go to a per-session cache, not the user's ~/.cache/dist_ft
os.environ["DIST_FT_CACHE"] = __import__("tempfile").mkdtemp(prefix="dist_ft_cache_")

import tiny  # noqa: E402

pytest_plugins = ["slurm_jobs"]  # the SLURM helpers and the shared one-node reference run

# Test tiers (markers registered in pyproject.toml). `python3 -m pytest -q -m unit` is the contributor's fast loop:
# in-process logic (config, formats, labels, packing and loss oracles on tiny models, bad inputs, device planning, lock
# and precision rules), about 1.5 min on 2 cores. Everything else is `integration` (training runs, multi-rank launches,
# serving, SLURM); `slurm` and `gpu` name what those need. The README's test command runs every tier.
UNIT_FILES = {
    "test_config.py",
    "test_layout.py",
    "test_loss.py",
    "test_packing.py",
    "test_perf.py",
    "test_model.py",
    "test_data.py",
    "test_stream_and_env.py",
    "test_cluster_configs.py",
    "test_bad_inputs.py",
    "test_gpu_path.py",
    "test_resume_rules.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if name in UNIT_FILES and "gpu" not in item.path.parent.name:
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.integration)
        if name.startswith("test_slurm"):
            item.add_marker(pytest.mark.slurm)
        if item.path.parent.name == "gpu":
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session", autouse=True)
def _no_shm_leftovers():
    """Runs this session SIGKILLs on purpose cannot unlink DeepSpeed's /dev/shm buffers; remove them at the end."""
    import time

    start = time.time()
    yield
    for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if p.stat().st_mtime >= start - 1:
                p.unlink()
        except OSError:
            pass


@pytest.fixture(scope="session", autouse=True)
def _shard_cache():
    yield
    import shutil

    shutil.rmtree(os.environ["DIST_FT_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny.make_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def gpt2_dropout_dir(tmp_path_factory) -> Path:
    return tiny.make_gpt2(tmp_path_factory.mktemp("gpt2-dropout"), dropout=0.1)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return tiny.make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    return tiny.write_jsonl(d / "train.jsonl", tiny.toy_chat(64)), tiny.write_jsonl(
        d / "val.jsonl", tiny.toy_chat(8)
    )
