"""Training you can watch: `sundae plot RUN` (log.jsonl -> curves.png), readable tick labels, TensorBoard event
files with `--set logger=tensorboard`, and a sampling progress bar that counts sampler steps."""

import dataclasses
import json
import shutil
import sys

import pytest
import torch
from PIL import Image

from cli_helpers import fails, run, write_random_tokens
from sundae import SamplerConfig, SundaePipeline
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.plots import nice_ticks, plot_curves, tick_labels
from sundae.tokens import TokenDataset
from sundae.train import GENERATOR_TRAIN_PRESETS, train_generator
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tick_labels_tell_close_values_apart():
    # The evaluate sweep plot of issue 18 labelled three ticks "162.2, 162.2, 162.1".
    assert tick_labels([162.15, 162.2, 162.25]) == ["162.15", "162.2", "162.25"]
    assert tick_labels([900.0, 1000.0, 1100.0]) == ["900", "1000", "1100"]  # not 1e+03
    assert tick_labels([0.001, 0.00105, 0.0011]) == ["0.001", "0.00105", "0.0011"]
    assert tick_labels([0.0, 0.025, 0.05, 0.07500000000000001]) == ["0", "0.025", "0.05", "0.075"]
    assert tick_labels([0.5, 1.0, 2.0, 5.0, 10.0]) == ["0.5", "1", "2", "5", "10"]
    assert tick_labels([1e-6, 2e-6]) == ["1e-06", "2e-06"]
    # Round ticks inside the range, 0.05 apart: 162.15, 162.20, 162.25.
    assert nice_ticks(162.14, 162.26, 4) == [162.15, 162.2, 162.25]
    # The largest round step giving 3 ticks or more in [-0.1, 0.9]: 0.5 gives 2 (0, 0.5), 0.25 gives 4.
    assert nice_ticks(-0.1, 0.9, 5) == [0.0, 0.25, 0.5, 0.75]


def test_plot_curves_draws_distinct_ticks_for_a_narrow_range(tmp_path):
    # FID values within 0.2 of each other over a sweep of T, as in `sundae evaluate --steps 4,8,16`.
    labels = plot_curves([4, 8, 16], {"fid": [162.18, 162.21, 162.12], "flat": [3.0, 3.0, 3.0]}, "T",
                         tmp_path / "c.png")
    for name in ("fid", "flat"):
        assert len(labels[name]) >= 3 and len(set(labels[name])) == len(labels[name])
    assert all(162.0 < float(v) < 162.4 for v in labels["fid"])
    assert labels["x"] == ["4", "8", "16"]  # a sweep: every x labelled
    assert Image.open(tmp_path / "c.png").size[0] > 0


def _log_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sundae_plot_draws_one_panel_per_logged_quantity(pipeline, tmp_path, capsys):
    for name, expected in (("tok", {"psnr", "codebook_usage", "d_loss", "lr", "images_per_s"}),
                           ("gen", {"loss_1", "loss_2", "grad_norm", "tokens_per_s"})):
        shutil.copy(pipeline / name / "log.jsonl", (tmp_path / name).mkdir() or tmp_path / name)
        records = _log_lines(tmp_path / name / "log.jsonl")
        keys = {k for r in records for k in r if k != "step"}
        assert expected <= keys
        run("plot", tmp_path / name)
        assert f"curves written to {tmp_path / name / 'curves.png'}" in capsys.readouterr().out
        width, height = Image.open(tmp_path / name / "curves.png").size
        assert (height - 70) / 150 == len(keys)  # panels of 150 pixels below a 30-pixel title, 40 for the x axis
    # Lines a crash cut short and the --init-from record (no numbers) are left out.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text('{"step": 0, "init_from": "a.pt", "init_sha256": "00"}\n'
                                       '{"step": 5, "loss": 4.1, "lr": 0.001}\n{"step": 10, "loss": 3.9, "lr": 0.001}\n'
                                       '{"step": 15, "lo')
    run("plot", run_dir)
    assert (Image.open(run_dir / "curves.png").size[1] - 70) / 150 == 2
    assert "does not exist" in fails(capsys, "plot", tmp_path / "nothing")


@pytest.fixture()
def tokens(tmp_path):
    (tmp_path / "tokens").mkdir()
    return TokenDataset(write_random_tokens(tmp_path / "tokens", 16, 10))


def test_tensorboard_event_files_hold_the_logged_scalars(tokens, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=4, batch_size=4, log_every=2,
                              sample_every=100, logger="tensorboard")
    train_generator(HG["tiny"], cfg, tokens, tmp_path / "run", {"grid": [4, 4]}, progress=False)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    records = _log_lines(tmp_path / "run" / "log.jsonl")
    assert set(events.Tags()["scalars"]) == {k for r in records for k in r if k != "step"}
    for key in ("loss", "loss_2", "lr", "grad_norm"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [2, 4]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)  # float32


def test_tensorboard_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    (tmp_path / "tokens").mkdir()
    write_random_tokens(tmp_path / "tokens", 16, 10)
    err = fails(capsys, "train", "--tokens", tmp_path / "tokens", "--out", tmp_path / "run", "--preset", "tiny",
                "--set", "logger=tensorboard", "--set", "batch_size=4", "--device", "cpu")
    assert "pip install tensorboard" in err
    assert "logger must be one of jsonl, tensorboard" in fails(
        capsys, "train", "--tokens", tmp_path / "tokens", "--out", tmp_path / "run2", "--preset", "tiny",
        "--set", "logger=wandb", "--device", "cpu")


class _Bar:
    """Stands in for tqdm: records the total and every update."""

    made = []

    def __init__(self, total=None, **kwargs):
        self.total, self.n, self.updates = total, 0, []
        _Bar.made.append(self)

    def update(self, k=1):
        self.updates.append(k)
        self.n += k

    def set_postfix_str(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_the_sampling_bar_advances_every_sampler_step(monkeypatch):
    import sundae.pipeline

    monkeypatch.setattr(sundae.pipeline, "tqdm", _Bar)
    torch.manual_seed(0)
    pipe = SundaePipeline(Hourglass(HG["tiny"]).eval(), VQGAN(dataclasses.replace(VQ["tiny"], codebook_size=64)).eval())
    pipe(num=1, class_labels=0, sampler=SamplerConfig(steps=6, early_stop=False))
    bar = _Bar.made[-1]
    # One image: the bar counts its 6 steps one by one (before, it counted one image, once, at the end).
    assert bar.total == 6 and bar.n == 6 and [k for k in bar.updates if k] == [1] * 6
    # 5 images in batches of 2: three batches of T steps; early-stopped batches still fill their share.
    pipe(num=5, class_labels=0, batch_size=2, sampler=SamplerConfig(steps=12, min_steps=2))
    bar = _Bar.made[-1]
    assert bar.total == 36 and bar.n == 36 and all(k >= 0 for k in bar.updates)


def test_plot_warns_about_a_diverged_loss_and_takes_the_log_file(tmp_path, caplog):
    from sundae.plots import plot_run

    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": float("inf")},
               {"step": 4, "loss": 1.5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN, Infinity literals
    with caplog.at_level("WARNING", logger="sundae"):
        out = plot_run(tmp_path / "log.jsonl")  # the file itself names its run folder
    assert out == tmp_path / "curves.png" and out.is_file()
    assert "loss is NaN or infinite in 2 record(s), first at step 2" in caplog.text
