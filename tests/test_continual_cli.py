"""``fedcl-dd continual`` and the class-incremental scenarios (issue 3, sections 2 and 3)."""

from __future__ import annotations

import gzip
import json

import pytest

pytest.importorskip("avalanche")

from fedcl_dd.scenarios.continual import class_order, make_benchmark, prepare_mnist_raw

from fedcl_dd.cli import main
from fedcl_dd.data import MNIST_FILES, DatasetNotFoundError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_continual_command_runs_a_stream_and_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "continual",
            "--benchmark",
            "split-digits",
            "--buffer",
            "pixels",
            "--budget-images",
            "20",
            "--iterations",
            "2",
            "--real-per-class",
            "16",
            "--train-mb-size",
            "10",
            "--batch-size-mem",
            "10",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert len(result["accuracy_after"]) == 5 and result["buffer_bytes"] <= 20 * 258
    assert (out / "buffer.png").stat().st_size > 0
    assert "experience 4: accuracy" in capsys.readouterr().out


def test_method_options_reach_the_memory_and_unknown_ones_are_refused(tmp_path, capsys):
    args = [
        "continual",
        "--benchmark",
        "split-digits",
        "--buffer",
        "addressing",
        "--budget-images",
        "20",
        "--iterations",
        "2",
        "--real-per-class",
        "8",
        "--no-progress",
    ]
    out = tmp_path / "run"
    # bf16 runs the memory's distillation and the fresh-model training under autocast.
    extra = [
        "--option",
        "syn-per-class=2",
        "--precision",
        "bf16",
        "--fresh",
        "--buffer-epochs",
        "2",
    ]
    assert main([*args, *extra, "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["config"]["options"] == {
        "syn_per_class": "2"
    }
    code = main([*args, "--option", "no-such-option=1", "--out", str(tmp_path / "bad")])
    assert code == 2
    assert "option no-such-option does not apply to method 'dm'" in capsys.readouterr().err


def test_continual_command_refuses_a_budget_below_one_image_per_class(tmp_path, capsys):
    code = main(
        [
            "continual",
            "--benchmark",
            "split-digits",
            "--budget-bytes",
            "1000",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "too small for one image per class" in capsys.readouterr().err


def test_class_orders_are_fixed_by_the_seed():
    # Pinned: a stream's classes must not move with a library's random generator.
    assert class_order(3) == [6, 0, 3, 7, 8, 5, 1, 9, 2, 4]
    assert class_order(0) == [4, 1, 7, 5, 3, 9, 0, 8, 6, 2]
    assert class_order(3) != class_order(4)
    bench = make_benchmark("split-digits", seed=3)
    order = class_order(3)
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [
        sorted(order[i : i + 2]) for i in range(0, 10, 2)
    ]


def test_prepare_mnist_raw_decompresses_gzipped_files_in_the_data_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(name.encode())
    assert prepare_mnist_raw(tmp_path) == tmp_path
    assert all((raw / name).read_bytes() == name.encode() for name in MNIST_FILES)
    (raw / MNIST_FILES[0]).unlink()
    (raw / f"{MNIST_FILES[0]}.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=MNIST_FILES[0]):
        prepare_mnist_raw(tmp_path)


def test_split_mnist_streams_the_real_data_in_the_seeds_order(data_root):
    bench = make_benchmark("split-mnist", seed=0, root=data_root)
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [
        sorted(class_order(0)[i : i + 2]) for i in range(0, 10, 2)
    ]
    assert sum(len(e.dataset) for e in bench.train_stream) == 60000
    x, y, task = bench.train_stream[0].dataset[0]
    assert tuple(x.shape) == (1, 28, 28) and task == 0 and int(y) in class_order(0)[:2]


def test_command_line_offers_every_buffer_and_strategy_the_runner_takes():
    """The parser spells its choices out (so ``fedcl-dd --help`` needs no Avalanche): they must
    stay the runner's own lists."""
    from fedcl_dd.strategies.avalanche.runner import BUFFER_CHOICES, STRATEGIES

    from fedcl_dd.cli import _parser

    continual = _parser()._subparsers._group_actions[0].choices["continual"]
    choices = {a.dest: a.choices for a in continual._actions}
    assert sorted(choices["buffer"]) == sorted(BUFFER_CHOICES)
    assert sorted(choices["strategy"]) == sorted(STRATEGIES)
