"""The GPU path, tested on a CPU: ``tests/gpu_check.py`` (its CPU answer, arguments and table), the device that
``genlab compare`` trains on, ``genlab bench``'s sampling batch, cuDNN autotuning, and CIFAR-10's random flips.

(No test here has "cuda" in its name: ``gpu_check`` runs ``pytest -k cuda`` on a GPU machine, and these are not
CUDA tests.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REPO, cifar, fake_cifar10
from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError

sys.path.insert(0, str(REPO / "tests"))
import gpu_check  # noqa: E402  (the script, imported as a module)


# --- the script ----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer of a machine without a GPU")
def test_the_script_without_a_gpu_says_so_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    assert gpu_check.main(["--json", str(tmp_path / "out.json")]) == 0  # `make gpu-check` exits 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check needs a CUDA GPU (none here); nothing measured.")
    assert "pytest -k cuda" in lines[0] and "set_sync_debug_mode" in lines[0] and "2000 DDPM steps" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no json, no cache, nothing


def test_arguments_and_their_checks(capsys):
    args = gpu_check.parse_args([])
    assert (args.steps, args.families, args.parts) == (2000, list(gpu_check.FAMILIES), list(gpu_check.PARTS))
    args = gpu_check.parse_args(["--steps", "500", "--families", "ddpm", "--parts", "sync,cifar"])
    assert (args.steps, args.families, args.parts) == (500, ["ddpm"], ["sync", "cifar"])
    assert "500 DDPM steps" in gpu_check.plan(args) and "bench" not in gpu_check.plan(args)
    for bad in (["--families", "gpt"], ["--parts", "fast"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
    assert "unknown families or parts ['gpt']" in capsys.readouterr().err


RESULTS = {
    "device_name": "NVIDIA H100", "torch": "2.x", "seconds": 412.0,
    "tests": {"passed": 5, "failed": 0, "skipped": 0, "seconds": 80.0, "ok": True},
    "sync": {"ddpm": {"steps": 3, "syncs": 0, "first": ""},
             "dcgan": {"steps": 3, "syncs": 6, "first": "called a synchronizing CUDA operation"},
             "vae": {"error": "RuntimeError: boom"}},
    "bench": {"ddpm": {"batch_size": 256, "sample_batch": 500, "variants": [
        {"variant": "eager_fp32", "images_per_s": 1000.0, "speedup": 1.0, "fraction_of_peak": 0.2,
         "compute_dtype": "fp32", "peak_memory_mb": 900.0},
        {"variant": "preset", "images_per_s": 5000.0, "speedup": 5.0, "fraction_of_peak": 0.45,
         "compute_dtype": "bf16", "peak_memory_mb": 700.0},
        {"variant": "compile", "error": "BackendCompilerFailed: x"}],
        "sampling": [{"sampler": "ddim-50", "images_per_s": 300.0, "nfe_per_image": 100}]}},
    "cifar": {"steps": 2000, "batch_size": 256, "steps_per_s": 20.0, "within_epoch_steps_per_s": 21.0,
              "boundary_steps_per_s": 15.0, "epoch_boundaries": 10, "window": 50},
}


def test_the_table_has_one_row_per_figure_and_fails_on_a_sync():
    text = gpu_check.format_table(RESULTS)
    assert text.startswith("gpu-check on NVIDIA H100") and text.count("\n| ") == 10  # header + 9 rows
    rows = {(row[0], row[1], row[2].split(" (")[0]): row for row in gpu_check.table_rows(RESULTS)}
    assert rows[("tests", "all", "pytest -k cuda")][3] == "5 passed, 0 failed, 0 skipped (80 s)"
    assert rows[("sync", "ddpm", "3 steps, syncs in the step")][3:] == ("none", "ok")
    assert rows[("sync", "dcgan", "3 steps, syncs in the step")][4] == "FAIL"
    assert rows[("sync", "vae", "training step")][3:] == ("RuntimeError: boom", "FAIL")
    preset = rows[("bench", "ddpm", "train preset")]
    assert preset[2] == "train preset (batch 256)" and "45.0% of the bf16 peak" in preset[3] and preset[4] == "ok"
    assert rows[("bench", "ddpm", "train eager_fp32")][4] == "-"  # the 40% goal is the bf16 step's
    assert rows[("bench", "ddpm", "train compile")][3].startswith("failed: BackendCompilerFailed")
    assert rows[("bench", "ddpm", "sample ddim-50")][2] == "sample ddim-50 (batch 500)"
    assert "20.00 steps/s overall; 21.00 within epochs, 15.00 in windows" in rows[("cifar10", "ddpm",
                                                                                "2000 steps of 256, 10 epoch boundaries")][3]
    assert gpu_check.failed(RESULTS)
    clean = {**RESULTS, "sync": {"ddpm": RESULTS["sync"]["ddpm"]}, "cifar": {"skipped": "CIFAR-10 not found"}}
    assert not gpu_check.failed(clean) and "skipped: CIFAR-10 not found" in gpu_check.format_table(clean)


def test_sync_counting_counts_the_warnings_of_the_debug_mode(monkeypatch):
    """``count_syncs`` counts what ``set_sync_debug_mode("warn")`` reports during the steps (faked on a CPU)."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    class Steps:
        def run_step(self):
            if modes[-1] == "warn":
                warnings.warn("called a synchronizing CUDA operation")

    assert gpu_check.count_syncs(Steps(), 3) == {"steps": 3, "syncs": 3,
                                                 "first": "called a synchronizing CUDA operation"}
    assert modes == ["warn", "default"]


# --- compare, bench, devices -----------------------------------------------------------------------
def test_compare_trains_on_the_comparison_device(tmp_path):
    from lab_utils.commands.compare import CompareConfig, family_config
    from lab_utils.core.schema import check_section

    cfg = compose(["preset=smoke", "device=cpu"], config_name="compare", check=False)
    cfg.compare = check_section(cfg.compare, CompareConfig, "compare")  # as compare() hands it on
    assert family_config(cfg, "ddpm", tmp_path / "ddpm").trainer.device == "cpu"
    cfg.device = "auto"
    assert family_config(cfg, "vae", tmp_path / "vae").trainer.device == "auto"


def test_bench_samples_at_evaluations_batch_on_a_gpu_and_at_a_small_one_elsewhere():
    from lab_utils.commands.bench import BenchConfig, sampling_batch
    from lab_utils.commands.evaluation import EvalConfig
    from lab_utils.core.schema import check_section

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for preset, expected in (("smoke", 32), ("cpu", 250), ("gpu", 500)):  # compare.eval_batch_size of each
        cfg = compose([f"preset={preset}"], config_name="bench", check=False)
        options = check_section(cfg.bench, BenchConfig, "bench")  # conf/bench.yaml's values, as bench() reads them
        assert sampling_batch(options, cfg, cuda) == expected == cfg.compare.eval_batch_size
        # off CUDA: not 250 images of guided DDPM-1000 (> 20 minutes on 2 cores)
        assert sampling_batch(options, cfg, cpu) == options.cpu_sample_batch == 16
    cfg = compose(["preset=smoke"], config_name="bench", check=False)
    assert sampling_batch(BenchConfig(sample_batch=7), cfg, cuda) == 7  # bench.sample_batch wins, everywhere
    assert sampling_batch(BenchConfig(sample_batch=7), cfg, cpu) == 7
    del cfg.compare
    assert sampling_batch(BenchConfig(), cfg, cuda) == EvalConfig.batch_size  # no compare block: genlab eval's
    with pytest.raises(ConfigError, match="bench.cpu_sample_batch must be positive"):
        check_section(compose(["bench.cpu_sample_batch=0"], config_name="bench", check=False).bench, BenchConfig,
                      "bench")


def test_cudnn_autotuning_follows_the_device(monkeypatch):
    from lab_utils.harness.devices import pick_device

    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        assert pick_device("cpu").type == "cpu" and torch.backends.cudnn.benchmark is False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, as pick_device sees it
        assert pick_device("cuda").type == "cuda" and torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = previous


def test_gpu_preset_switches():
    cfg = compose(["model=ddpm", "data=cifar10", "preset=gpu"])
    assert cfg.trainer.channels_last is False  # CUDA GroupNorm has no NHWC kernel: on only where bench says so
    assert cfg.trainer.batch_size * cfg.trainer.steps == pytest.approx(cfg.compare.max_images, rel=0.05)
    assert cfg.trainer.ema_warmup is True  # the first grids and KID probes do not sample the initialisation
    assert list(cfg.compare.fid_guidance) == [1.0, 1.5, 2.0, 3.0]
    for preset in ("cpu", "smoke"):  # make demo and the tests: no sweep, no warm-up (their figures unchanged)
        other = compose(["model=ddpm", f"preset={preset}"])
        assert other.compare.get("fid_guidance") is None and not other.trainer.ema_warmup
    assert cfg.data.random_flip is True


# --- random horizontal flips ---------------------------------------------------------------------
@pytest.fixture
def cifar_root(tmp_path) -> Path:
    return fake_cifar10(tmp_path)


def mirrored(dataset, images: torch.Tensor, order: list[int]) -> torch.Tensor:
    """(B,) bool: which images of a batch are the mirror of their item (and the rest are the item itself)."""
    plain = torch.stack([dataset[i]["image"] for i in order])  # (B, C, S, S)
    flipped = torch.tensor([torch.equal(x, p.flip(-1)) for x, p in zip(images, plain)])
    same = torch.tensor([torch.equal(x, p) for x, p in zip(images, plain)])
    assert torch.all(flipped ^ same)
    return flipped


def test_cifar_training_batches_flip_half_the_images_the_same_way_for_a_seed(cifar_root):
    from lab_utils.harness.data_stream import DataStream

    train = cifar(cifar_root, random_flip=True)
    assert train.random_flip and not cifar(cifar_root, "test", random_flip=True).random_flip
    batches = []
    for global_seed in range(2):  # the trainer's stream, twice with the same seed (the coins draw nothing from
        torch.manual_seed(global_seed)  # torch's RNG: the run's own draws cannot move them)
        stream = DataStream(train, batch_size=40, seed=0, device=torch.device("cpu"))
        batches.append([next(stream) for _ in range(2)])  # the whole epoch: 2 batches of 40
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(*batches))
    order = torch.randperm(80, generator=torch.Generator().manual_seed(0)).tolist()  # DistributedSampler's order
    images = torch.cat([batch["image"] for batch in batches[0]])
    flips = mirrored(train, images, order)
    assert 28 <= int(flips.sum()) <= 52  # ~ Binomial(80, 1/2): mean 40, sd 4.5
    assert [batch["caption"] for batch in batches[0]][0] == [train.caption(i) for i in order[:40]]
    assert all(torch.equal(train[3]["image"], cifar(cifar_root)[3]["image"]) for _ in range(3))  # items never flip


def test_loader_workers_flip_reproducibly_and_no_flip_without_the_option(cifar_root):
    from lab_utils.harness.data_stream import DataStream

    train = cifar(cifar_root, random_flip=True)
    runs = []
    for workers in (2, 0):  # the coins hash (seed, epoch, item): the same in worker processes as in ours
        stream = DataStream(train, batch_size=20, seed=1, device=torch.device("cpu"), num_workers=workers)
        runs.append(torch.cat([next(stream)["image"] for _ in range(4)]))
    assert torch.equal(*runs)
    order = torch.randperm(80, generator=torch.Generator().manual_seed(1)).tolist()
    assert 20 <= int(mirrored(train, runs[0], order).sum()) <= 60
    resumed = DataStream(train, batch_size=20, seed=1, device=torch.device("cpu"), num_workers=2)
    resumed.load_state_dict({"epoch": 0, "position": 2, "global_batch": 20})
    assert torch.equal(torch.cat([next(resumed)["image"] for _ in range(2)]), runs[0][40:])  # a resume: same flips
    batch = next(iter(DataLoader(train, batch_size=80)))["image"]  # a DataLoader of one's own: the items as stored
    assert not mirrored(train, batch, list(range(80))).any()
    plain = cifar(cifar_root)  # the dataclass default: today's unflipped stream
    assert not plain.random_flip
    stream = DataStream(plain, batch_size=80, seed=1, device=torch.device("cpu"))
    assert not mirrored(plain, next(stream)["image"], order).any()


def test_shapes_never_flips(tmp_path):
    from lab_utils.core.data import build_dataset

    assert "random_flip" not in compose(["data=shapes"], config_name="dataview").data
    with pytest.raises(ConfigError, match="random_flip"):  # its captions say left and right
        compose(["data=shapes", "+data.random_flip=true"], config_name="dataview")
    shapes = build_dataset({"name": "shapes", "subset": 32, "num_train": 64, "num_test": 16,
                            "cache_dir": str(tmp_path)}, "train")
    assert not shapes.random_flip
    torch.manual_seed(0)
    batch = next(iter(DataLoader(shapes, batch_size=32)))["image"]
    assert torch.equal(batch, torch.stack([shapes[i]["image"] for i in range(32)]))
