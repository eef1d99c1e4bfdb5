"""The command line: a run writes its set, results and grid; bad input gets one clear line."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcl_dd.cli import main, parse_settings
from fedcl_dd.io import load_checkpoint, save_checkpoint
from fedcl_dd.synthetic import SyntheticSet


def test_distill_writes_set_results_and_grid_then_evaluate_reads_it(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "distill",
        "--dataset",
        "digits",
        "--ipc",
        "2",
        "--iterations",
        "3",
        "--eval-epochs",
        "5",
        "--eval-models",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    syn = SyntheticSet.load(out / "synthetic.safetensors")
    assert results["nbytes"] == syn.nbytes <= results["budget_bytes"]
    assert results["num_images"] == 20 and len(results["accuracies"]) == 2
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert syn.info["method"] == "dm" and syn.info["dataset"] == "digits"
    assert (
        main(
            [
                "evaluate",
                str(out / "synthetic.safetensors"),
                "--dataset",
                "digits",
                "--eval-epochs",
                "5",
                "--eval-models",
                "1",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["accuracy_mean"] <= 1


def test_resume_continues_a_run(tmp_path):
    base = ["distill", "--dataset", "digits", "--ipc", "1", "--eval-epochs", "2"]
    base += ["--eval-models", "1", "--no-progress", "--checkpoint-every", "1"]

    def distill(out, *extra):
        return main([*base, "--out", str(out), *extra])

    out = tmp_path / "run"
    assert distill(out, "--iterations", "2") == 0
    assert distill(out, "--iterations", "4", "--resume") == 0
    assert json.loads((out / "results.json").read_text())["iterations"] == 4
    # The resumed run starts from the checkpoint (a resume that ignored it and ran 4 fresh
    # iterations would end where this one does): moved images there move the result. That a
    # resume is bit-exact is test_distill's.
    resumed = SyntheticSet.load(out / "synthetic.safetensors").images()
    moved = tmp_path / "moved"
    assert distill(moved, "--iterations", "2") == 0
    state = load_checkpoint(moved / "checkpoint.pt")
    state["syn"]["pixels"] += 1.0
    save_checkpoint(state, moved / "checkpoint.pt")
    assert distill(moved, "--iterations", "4", "--resume") == 0
    assert not torch.equal(SyntheticSet.load(moved / "synthetic.safetensors").images(), resumed)


@pytest.mark.parametrize(
    "args,message",
    [
        (["distill", "--dataset", "digits", "--ipc", "0"], "images per class must be >= 1"),
        (
            ["distill", "--dataset", "digits", "--budget-bytes", "100"],
            "too small for one image per class",
        ),
        (
            ["distill", "--dataset", "digits", "--param", "addressing", "--budget-bytes", "60"],
            "too small",
        ),
        (
            ["distill", "--dataset", "digits", "--epsilon", "8"],
            "option epsilon does not apply to method 'dm'",
        ),
        (
            ["distill", "--dataset", "digits", "--resume", "--out", "/nonexistent/x"],
            "no checkpoint at",
        ),
        (["--data-root", "/nonexistent/root", "distill", "--dataset", "mnist"], "MNIST"),
        (["evaluate", "/nonexistent/s.safetensors", "--dataset", "digits"], "no synthetic set at"),
        # a --set naming a key with its own flag would silently override that flag
        (
            ["simulate", "--rounds", "5", "--set", "rounds=3"],
            "rounds has its own flag; use --rounds",
        ),
        (["simulate", "--set", "algorithm=fedavg"], "algorithm has its own flag; use --strategy"),
        (["simulate", "--set", "perturb"], "--set 'perturb': write KEY=VALUE"),
        (["continual", "--benchmark", "split-digits", "--option", "=3"], "--option '=3': write"),
    ],
)
def test_bad_input_gets_a_clear_error(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedcl-dd: error:") and message in err and "Traceback" not in err


def test_unknown_dataset_and_method_are_refused_by_the_parser(capsys):
    for args in (
        ["distill", "--dataset", "svhn"],
        ["distill", "--dataset", "digits", "--method", "kip"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_method_options_are_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--dataset", "digits", "--real-per-class", "0"])
    assert "real-per-class=0 is outside [1" in capsys.readouterr().err


def test_evaluate_refuses_a_set_of_another_dataset(tmp_path, capsys):
    out = tmp_path / "run"
    main(
        [
            "distill",
            "--dataset",
            "digits",
            "--ipc",
            "1",
            "--iterations",
            "1",
            "--eval-epochs",
            "1",
            "--eval-models",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert main(["evaluate", str(out / "synthetic.safetensors"), "--dataset", "cifar10"]) == 2
    assert "but cifar10 has" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(item=st.text(alphabet="ab:=-_ 1", max_size=8))
def test_settings_split_at_the_first_equals_or_are_refused_naming_the_item(item):
    """``KEY=VALUE`` items: the key is everything before the first '=' and the value the rest;
    an item without '=', with an empty key, or naming a key that has its own flag is refused
    with the item quoted, so nothing is silently dropped or overridden."""
    own = {"a": "--a"}
    key, sep, value = item.partition("=")
    bare = key.rpartition(":")[2]
    if sep and bare and bare not in own:
        assert parse_settings([item], own_flags=own) == {key: value}
    else:
        with pytest.raises(ValueError, match="--set") as err:
            parse_settings([item], own_flags=own)
        assert repr(item) in str(err.value)
