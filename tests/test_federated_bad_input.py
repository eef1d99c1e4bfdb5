"""Bad federated input fails before round 1 with the value and the fix; grids never read the test set."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from bench_scripts import load_script
from fedcl_dd.scenarios.federated import (
    Partitioning,
    Preset,
    class_histogram,
    client_data,
    parse_preset,
)
from fedcl_dd.strategies.flower.config import FedConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants.utils import MAX_SIGMA

from fedcl_dd.privacy import PrivacyBudgetError, epsilon_for

DIGITS_TRAIN = 1347  # records in digits' fixed training split (fedcl_dd.data)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/federated.py, the module whose grid selection the benchmark runs."""
    return load_script("federated")


# --- presets split too thin --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_preset_with_too_many_clients_is_refused_with_the_fix():
    with pytest.raises(ValueError) as err:
        class_histogram(parse_preset("digits-dir0.5-1000"))  # what the server reads before round 1
    msg = str(err.value)
    assert "digits-dir0.5-1000" in msg and f"{DIGITS_TRAIN} training records" in msg
    assert "fewer clients than 1000" in msg and "larger alpha than 0.5" in msg


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    clients=st.integers(DIGITS_TRAIN + 1, 20 * DIGITS_TRAIN),
    kind=st.sampled_from(["iid", "dir0.5", "path2"]),
)
def test_more_clients_than_records_is_refused_by_server_and_clients(clients: int, kind: str):
    preset = parse_preset(f"digits-{kind}-{clients}")
    for read in (lambda: class_histogram(preset), lambda: client_data(preset, 0)):
        with pytest.raises(ValueError) as err:
            read()
        msg = str(err.value)
        assert preset.name in msg and f"for {clients} clients" in msg
        assert f"Use at most {DIGITS_TRAIN} clients" in msg


def test_pathological_preset_whose_classes_cannot_feed_their_clients_is_refused():
    # About 268 clients share each class of about 134 records.
    with pytest.raises(ValueError) as err:
        class_histogram(parse_preset("digits-path2-1340"))
    msg = str(err.value)
    assert "digits-path2-1340" in msg
    assert "fewer clients than 1340 or fewer classes per client than 2" in msg


def test_clients_left_without_training_records_are_named():
    # Two or three records per client, all kept for local evaluation at this test share.
    preset = Preset("digits-iid-600", "digits", Partitioning("iid", 600), test_fraction=0.99)
    with pytest.raises(ValueError) as err:
        class_histogram(preset)
    msg = str(err.value)
    assert "digits-iid-600" in msg and "get no training record" in msg
    assert "600 of them (partition ids 0, 1, 2," in msg
    assert "fewer clients than 600" in msg


def test_a_malformed_alpha_names_itself():
    with pytest.raises(ValueError, match=r"alpha '0\.5\.1' is not a number.*digits-dir0\.5-4"):
        parse_preset("digits-dir0.5.1-4")


def test_presets_that_fit_still_split():
    hist = class_histogram(parse_preset("digits-dir0.5-4"))
    assert hist.shape == (4, 10) and int(hist.sum(1).min()) > 0


# --- epsilon the run cannot meet -------------------------------------------------------------


with warnings.catch_warnings():  # Opacus notes that the optimal order is its largest
    warnings.simplefilter("ignore")
    FLOOR = epsilon_for(MAX_SIGMA, 1.0, 1, 1e-5)  # the accountant's least epsilon at delta 1e-5


@settings(max_examples=25, deadline=None)
@given(
    epsilon=st.floats(1e-4, FLOOR * 0.99),
    rounds=st.integers(1, 20),
    iterations=st.integers(1, 500),
)
def test_unreachable_epsilon_is_refused_when_the_config_is_built(epsilon, rounds, iterations):
    values = {"method": "dm-dp", "epsilon": epsilon, "rounds": rounds, "iterations": iterations}
    with pytest.raises(PrivacyBudgetError) as err:
        FedConfig.from_mapping(values)  # the server's first step, before any round
    msg = str(err.value)
    assert f"epsilon={epsilon:g}" in msg
    assert f"rounds={rounds} x iterations={iterations} = {rounds * iterations} releases" in msg
    assert "Use a larger epsilon (above 0.103) or a larger delta" in msg


@settings(max_examples=25, deadline=None)
@given(epsilon=st.floats(0.5, 100.0), rounds=st.integers(1, 20), iterations=st.integers(1, 500))
def test_reachable_epsilon_is_accepted(epsilon, rounds, iterations):
    cfg = FedConfig(method="dm-dp", epsilon=epsilon, rounds=rounds, iterations=iterations)
    assert cfg.planned_iterations == rounds * iterations


def test_unreachable_epsilon_is_refused_whatever_the_sample_rate():
    with pytest.raises(PrivacyBudgetError, match=r"epsilon=0\.05 .*Use a larger epsilon"):
        FedConfig(method="dm-dp", epsilon=0.05, options={"sample-rate": 0.5})


@settings(max_examples=10, deadline=None)
@given(epsilon=st.floats(1e-4, FLOOR * 0.99), rounds=st.integers(1, 50))
def test_dp_sgd_baseline_with_unreachable_epsilon_is_refused(epsilon, rounds):
    with pytest.raises(PrivacyBudgetError) as err:
        FedConfig(algorithm="fedavg", epsilon=epsilon, rounds=rounds)
    msg = str(err.value)
    assert "fedavg clients (DP-SGD)" in msg and f"epsilon={epsilon:g}" in msg
    assert "Use a larger epsilon" in msg


@pytest.mark.parametrize(
    ("values", "fix"),
    [
        ({"method": "dm-dp", "iterations": 0}, "use iterations >= 1"),
        ({"algorithm": "fedavg", "local_epochs": 0}, "use local-epochs >= 1"),
    ],
)
def test_private_run_without_releases_is_refused(values: dict[str, Any], fix: str):
    with pytest.raises(ValueError, match="no private release") as err:
        FedConfig(epsilon=8.0, **values)
    assert fix in str(err.value) and "epsilon=8" in str(err.value)


# --- grid selection ------------------------------------------------------------------------


def _entry(bench: ModuleType, i: int, val: float | None, test: float | None) -> dict:
    results = {"rounds": [{"round": 1, "accuracy": test, "validation_accuracy": val}]}
    return bench.grid_entry({"i": i}, results, 1.0, 1.0)


finite = st.floats(0.0, 1.0)
maybe = st.one_of(finite, st.just(float("nan")), st.none())


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    vals=st.lists(maybe, min_size=1, max_size=8).filter(
        lambda v: any(x is not None and math.isfinite(x) for x in v)
    ),
    data=st.data(),
)
def test_choice_is_best_validation_whatever_the_test_accuracies(bench, vals, data):
    tests = data.draw(st.lists(maybe, min_size=len(vals), max_size=len(vals)))
    poisoned = data.draw(st.lists(maybe, min_size=len(vals), max_size=len(vals)))
    chosen = bench.choose_setting(
        [_entry(bench, i, v, t) for i, (v, t) in enumerate(zip(vals, tests, strict=True))]
    )
    again = bench.choose_setting(
        [_entry(bench, i, v, t) for i, (v, t) in enumerate(zip(vals, poisoned, strict=True))]
    )
    scores = [v if v is not None and math.isfinite(v) else -math.inf for v in vals]
    assert chosen["setting"] == again["setting"] == {"i": scores.index(max(scores))}


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(vals=st.lists(st.sampled_from([None, float("nan")]), min_size=1, max_size=6))
def test_grid_without_validation_accuracy_is_an_error_with_the_fix(bench, vals):
    grid = [_entry(bench, i, v, 0.9) for i, v in enumerate(vals)]
    with pytest.raises(ValueError) as err:
        bench.choose_setting(grid, "fedavg")
    msg = str(err.value)
    assert "the fedavg grid selects nothing" in msg and f"none of its {len(vals)} settings" in msg
    assert "fraction-evaluate" in msg


def test_empty_grid_is_an_error_with_the_fix(bench):
    with pytest.raises(ValueError, match=r"the synthetic grid has no settings.*GRIDS"):
        bench.choose_setting([], "synthetic")


def test_benchmark_grid_choice_ignores_poisoned_test_labels(bench, monkeypatch, tmp_path):
    """benchmarks/federated.py --grid, its runs replaced by fixed predictions: permuting the test
    labels changes which setting is best on test, never the one chosen."""
    gen = torch.Generator().manual_seed(0)
    classes, n = 10, 200
    val_y = torch.randint(classes, (n,), generator=gen)
    test_y = torch.randint(classes, (n,), generator=gen)
    # Setting i is right on the first share_i of each split, wrong (label + 1) on the rest.
    val_share, test_share = [0.6, 0.8, 0.7, 0.5], [0.6, 0.9, 0.7, 0.5]
    poison = torch.roll(torch.arange(classes), 1)  # a permutation of the label values

    def predict(y: torch.Tensor, share: float) -> torch.Tensor:
        k = int(share * len(y))
        return torch.cat([y[:k], (y[k:] + 1) % classes])

    # Setting 3 predicts what the poisoned labels say: best on the poisoned test set.
    test_pred = [predict(test_y, s) for s in test_share[:3]] + [poison[test_y]]

    def run(labels: torch.Tensor) -> tuple[dict, dict]:
        """The benchmark's chosen setting, and the setting best on ``labels``."""

        def fake_run_once(cfg: FedConfig, out: Path, reuse: bool, data_root: str | None):
            i = bench.GRIDS["fedavg"].index(
                {"local-epochs": cfg.local_epochs, "local-lr": cfg.local_lr}
            )
            val_pred = predict(val_y, val_share[i])
            row = {
                "round": 1,
                "accuracy": float((test_pred[i] == labels).float().mean()),
                "validation_accuracy": float((val_pred == val_y).float().mean()),
                "upload_bytes": 10,
                "upload_bytes_total": 10,
                "epsilon_max": 0.0,
            }
            return {"config": cfg.to_dict(), "rounds": [row]}, 1.0, 1.0

        monkeypatch.setattr(bench, "run_once", fake_run_once)
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        argv = ["--grid", "--strategies", "fedavg", "--fedavg-rounds", "1", "--out", str(out)]
        assert bench.main(argv) == 0
        summary = json.loads((out / "summary.json").read_text())["summary"]
        (row,) = [r for r in summary if r.get("strategy") == "fedavg"]
        return row["chosen"], max(row["grid"], key=lambda g: g["test_accuracy"])["setting"]

    chosen, best_on_test = run(test_y)
    chosen_poisoned, best_on_poisoned_test = run(poison[test_y])
    assert best_on_poisoned_test != best_on_test, "the poison does not change the test ranking"
    assert chosen == chosen_poisoned == bench.GRIDS["fedavg"][1]


def _results(cfg: FedConfig, accuracy: float, validation: float) -> dict:
    """A run's results.json as the benchmark reads it: rounds 0..cfg.rounds at one accuracy
    and validation accuracy, 10 bytes up a round."""
    rows = [
        {
            "round": r,
            "accuracy": accuracy,
            "validation_accuracy": validation,
            "upload_bytes": 10,
            "upload_bytes_total": 10 * r,
            "epsilon_max": 0.0,
        }
        for r in range(cfg.rounds + 1)
    ]
    return {"config": cfg.to_dict(), "rounds": rows}


def test_select_rounds_chooses_on_short_runs_then_continues_the_chosen_one(
    bench, monkeypatch, tmp_path
):
    """--grid --select-rounds 2 with 5 FedAvg rounds: every grid setting runs 2 rounds, and
    the chosen one (best validation) goes on to 5 in the strategy's own folder, from a copy of
    its grid run (its checkpoint), resumed (``reuse``)."""
    calls = []

    def fake_run_once(cfg: FedConfig, out: Path, reuse: bool, data_root: str | None):
        found = out / "checkpoint.pt"
        calls.append((cfg.rounds, out, reuse, found.read_text() if found.is_file() else None))
        out.mkdir(parents=True, exist_ok=True)
        # What the grid run of this setting leaves for a later resume.
        found.write_text(f"{cfg.local_epochs} epochs, lr {cfg.local_lr}, {cfg.rounds} rounds")
        i = bench.GRIDS["fedavg"].index(
            {"local-epochs": cfg.local_epochs, "local-lr": cfg.local_lr}
        )
        return _results(cfg, 0.5, [0.7, 0.6, 0.9, 0.8][i]), 1.0, 1.0

    monkeypatch.setattr(bench, "run_once", fake_run_once)
    out = tmp_path / "out"
    argv = ["--grid", "--select-rounds", "2", "--strategies", "fedavg", "--fedavg-rounds", "5"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    assert [c[0] for c in calls] == [2, 2, 2, 2, 5]
    _, final, reuse, checkpoint = calls[-1]
    assert final == out / "fedavg" and reuse
    # The chosen setting's grid run (setting 2: 5 epochs at lr 0.01), copied before it goes on.
    assert checkpoint == "5 epochs, lr 0.01, 2 rounds"
    summary = json.loads((out / "summary.json").read_text())["summary"]
    (row,) = [r for r in summary if r.get("strategy") == "fedavg"]
    assert row["chosen"] == bench.GRIDS["fedavg"][2] and row["rounds"] == 5


def test_reuse_takes_a_finished_resumed_run_as_it_is_and_resumes_an_unfinished_one(
    bench, monkeypatch, tmp_path
):
    """A run resumed after round 2 and finished has rows 1..5 and no row 0: ``--reuse`` takes
    its results as they are (the validation accuracies only results.json holds included) and
    does not resume it; a run whose last row is short of its rounds is resumed."""
    cfg = FedConfig(preset="digits-iid-2", algorithm="fedavg", rounds=5)
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"round": r, "accuracy": 0.9, "validation_accuracy": 0.8} for r in range(1, 6)]
    done = {"config": cfg.to_dict(), "rounds": rows, "complete": True, "resumed_after": 2}
    (out / "results.json").write_text(json.dumps(done))
    (out / "checkpoint.pt").write_bytes(b"left by the run")
    resumed: list[bool] = []

    def fake_simulate(cfg: FedConfig, out: Path, resume: bool, data_root: str | None) -> dict:
        resumed.append(resume)
        return {"config": cfg.to_dict(), "rounds": rows, "resumed_after": 4}

    monkeypatch.setattr(bench, "simulate", fake_simulate)
    results, _, _ = bench.run_once(cfg, out, True, None)
    assert resumed == [] and results["rounds"] == rows
    (out / "results.json").write_text(json.dumps({**done, "rounds": rows[:4], "complete": False}))
    (out / "cost.json").write_text(json.dumps({"seconds": 100.0, "peak_mib": 5e6}))
    _, seconds, peak = bench.run_once(cfg, out, True, None)
    assert resumed == [True]
    # The parts before the resume count in: seconds add up, the peak is the highest.
    cost = json.loads((out / "cost.json").read_text())
    assert 100.0 <= seconds == cost["seconds"] < 160.0 and peak == cost["peak_mib"] == 5e6
    # Each part says which machine ran it (the one from before parts were recorded: unknown).
    earlier, part = cost["parts"]
    assert earlier == {"started_after_round": None, "seconds": 100.0, "machine": None}
    assert part["started_after_round"] == 4 and part["machine"]["cores"] >= 1
    assert part["seconds"] == pytest.approx(seconds - 100.0)
    # While a part runs its cost is on disk, so a part stopped by a session's end counts.
    monkeypatch.setattr(bench, "COST_EVERY", 0.05)
    during = []

    def slow_simulate(cfg: FedConfig, out: Path, resume: bool, data_root: str | None) -> dict:
        time.sleep(0.5)
        during.append(json.loads((out / "cost.json").read_text()))
        return fake_simulate(cfg, out, resume, data_root)

    monkeypatch.setattr(bench, "simulate", slow_simulate)
    (out / "results.json").write_text(json.dumps({**done, "rounds": rows[:4], "complete": False}))
    _, seconds, _ = bench.run_once(cfg, out, True, None)
    assert during[0]["running"] and during[0]["seconds"] >= cost["seconds"] + 0.1
    final = json.loads((out / "cost.json").read_text())
    assert "running" not in final and final["seconds"] == seconds >= during[0]["seconds"]
    assert len(final["parts"]) == 3
    assert sum(p["seconds"] for p in final["parts"]) == pytest.approx(seconds)
    monkeypatch.setattr(bench, "simulate", fake_simulate)
    # Short of its rounds with no checkpoint (a fresh clone): run anew, never reported whole.
    (out / "checkpoint.pt").unlink()
    (out / "results.json").write_text(json.dumps({**done, "rounds": rows[:4], "complete": False}))
    _, seconds, _ = bench.run_once(cfg, out, True, None)
    assert resumed == [True, True, False] and seconds < 60.0


def test_grid_values_replace_one_key_and_keep_the_folder_order(bench, monkeypatch, tmp_path):
    """--grid-values server-epochs=30,100: the synthetic grid runs 30 and 100 epochs at each of
    its own learning rates, epochs outermost (grid0..grid3), and the summary records them."""
    seen = []

    def fake_run_once(cfg: FedConfig, out: Path, reuse: bool, data_root: str | None):
        seen.append((out.name, cfg.server_epochs, cfg.server_lr))
        row = {
            "round": 1,
            "accuracy": 0.5,
            "validation_accuracy": cfg.server_epochs / 1000 + cfg.server_lr,
            "upload_bytes": 10,
            "upload_bytes_total": 10,
            "epsilon_max": 0.0,
        }
        return {"config": cfg.to_dict(), "rounds": [row]}, 1.0, 1.0

    monkeypatch.setattr(bench, "run_once", fake_run_once)
    argv = ["--grid", "--strategies", "synthetic", "--rounds", "1", "--out", str(tmp_path)]
    assert bench.main([*argv, "--grid-values", "server-epochs=30,100"]) == 0
    assert seen == [
        ("grid0", 30, 0.01),
        ("grid1", 30, 0.05),
        ("grid2", 100, 0.01),
        ("grid3", 100, 0.05),
    ]
    (row,) = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert row["chosen"] == {"server-epochs": 100, "server-lr": 0.05}
    assert [g["setting"]["server-epochs"] for g in row["grid"]] == [30, 30, 100, 100]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.sampled_from(["server-epochs", "server-lr", "local-lr", "rounds", "server_epochs", ""]),
    raw=st.lists(st.sampled_from(["30", "0.05", "", " ", "x"]), max_size=3).map(",".join),
    sep=st.sampled_from(["=", ":"]),
)
def test_grid_values_are_parsed_or_refused_with_the_fix(bench, key, raw, sep):
    """A KEY=V1,V2 item is accepted only with '=', a key of a chosen strategy's grid and at
    least one value; anything else names the item and what to write."""
    item = f"{key}{sep}{raw}"
    values = [v.strip() for v in raw.split(",") if v.strip()]
    # Of the values drawn, server-epochs takes "30" (whole numbers > 0), server-lr "30" and
    # "0.05" (numbers > 0, as floats); nothing else is a key of the synthetic grid.
    takes = {"server-epochs": {"30"}, "server-lr": {"30", "0.05"}}.get(key, set())
    if sep == "=" and values and set(values) <= takes:
        parsed = bench.grid_overrides([item], ["synthetic"])[key]
        kind = int if key == "server-epochs" else float
        assert parsed == tuple(kind(v) for v in values)
        assert all(type(v) is kind for v in parsed)
    else:
        with pytest.raises(ValueError, match="--grid-values"):
            bench.grid_overrides([item], ["synthetic"])


def test_reuse_refuses_results_of_another_configuration(bench, tmp_path):
    """--reuse takes a folder's finished results only if the same configuration wrote them:
    a grid folder from other grid values is refused with the keys that differ."""
    cfg = FedConfig.from_mapping({"preset": "digits-dir0.5-4", "algorithm": "fedavg"})
    other = FedConfig.from_mapping({**cfg.to_dict(), "local-epochs": 5})
    (tmp_path / "results.json").write_text(
        json.dumps({"config": other.to_dict(), "rounds": [], "complete": True})
    )
    with pytest.raises(ValueError, match=r"local-epochs: 5 vs 1"):
        bench.run_once(cfg, tmp_path, True, None)


def test_grid_values_without_grid_is_refused(bench, capsys):
    """--grid-values alone would be ignored silently; it is refused, naming the fix."""
    with pytest.raises(SystemExit):
        bench.main(["--grid-values", "server-epochs=30,100", "--strategies", "synthetic"])
    assert "add --grid" in capsys.readouterr().err


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    scope=st.sampled_from(["", "synthetic:", "fedavg:", "fedprox:", "x:", ":"]),
    key=st.sampled_from(["param", "iterations", "rounds", "preset", ""]),
    sep=st.sampled_from(["=", ""]),
)
def test_set_items_are_scoped_or_refused_with_the_fix(bench, scope, key, sep):
    """--set [STRATEGY:]KEY=VALUE: a scoped item reaches its strategy alone, an unscoped one
    every strategy; an item without '=', with a key that has its own flag or scoped to a
    strategy not run is refused, naming the item."""
    item = f"{scope}{key}{sep}7"
    strategies = ["synthetic", "fedavg"]
    name = scope.rstrip(":")
    if sep and key in ("param", "iterations") and scope in ("", "synthetic:", "fedavg:"):
        shared, own = bench.scoped_settings([item], strategies)
        assert (shared, own) == (
            ({key: "7"}, {"synthetic": {}, "fedavg": {}})
            if not scope
            else ({}, {"synthetic": {}, "fedavg": {}, name: {key: "7"}})
        )
    else:
        with pytest.raises(ValueError, match="--set") as err:
            bench.scoped_settings([item], strategies)
        assert repr(item) in str(err.value)


def test_scoped_set_keeps_the_baselines_config_at_its_defaults(bench, monkeypatch, tmp_path):
    """One invocation runs ours with distillation settings beside FedAvg: each run's recorded
    configuration holds only its own (what --reuse compares), a scoped item wins over a
    shared one, and the shared ones reach both."""
    seen: dict[str, FedConfig] = {}

    def fake_run_once(cfg: FedConfig, out: Path, reuse: bool, data_root: str | None):
        seen[cfg.algorithm] = cfg
        row = {"round": 1, "accuracy": 0.5, "upload_bytes": 1, "upload_bytes_total": 1}
        return {"config": cfg.to_dict(), "rounds": [row]}, 1.0, 1.0

    monkeypatch.setattr(bench, "run_once", fake_run_once)
    argv = ["--strategies", "synthetic", "fedavg", "--out", str(tmp_path), "--set", "ipc=5"]
    argv += ["--set", "synthetic:param=multi", "--set", "synthetic:ipc=3"]
    assert bench.main(argv) == 0
    default = FedConfig()
    assert (seen["synthetic"].param, seen["synthetic"].ipc) == ("multi", 3)
    assert (seen["fedavg"].param, seen["fedavg"].ipc) == (default.param, 5)


def test_baselines_out_reads_the_baselines_of_another_run_and_needs_reuse(
    bench, monkeypatch, tmp_path
):
    """With ``--baselines-out DIR --reuse`` the baselines' folders are looked up under DIR
    (an earlier run's tuned FedAvg), ours' under ``--out``, and the summary (in ``--out``)
    compares ours against that baseline; without ``--reuse`` it is refused, since it would
    run the other run's baselines again over their files."""
    folders: list[Path] = []

    def fake_run_once(cfg: FedConfig, out: Path, reuse: bool, data_root: str | None):
        folders.append(out)
        acc = 0.9 if cfg.algorithm == "synthetic" else 0.8
        return _results(cfg, acc, acc), 1.0, 1.0

    monkeypatch.setattr(bench, "run_once", fake_run_once)
    out, other = tmp_path / "variant", tmp_path / "tuned"
    argv = ["--strategies", "synthetic", "fedavg", "--rounds", "2", "--fedavg-rounds", "4"]
    argv += ["--out", str(out), "--baselines-out", str(other)]
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert folders == []
    assert bench.main([*argv, "--reuse"]) == 0
    assert folders == [out / "synthetic", other / "fedavg"]
    summary = json.loads((out / "summary.json").read_text())
    rows = [r for r in summary["summary"] if "strategy" in r]
    assert [r["folder"] for r in rows] == [str(f) for f in folders]
    # Ours reaches the baseline's 0.8 in round 1 with 10 of its 40 bytes.
    ratio = {t["name"]: t["value"] for t in summary["targets"]}
    assert not (other / "summary.json").exists() and any(v == 0.25 for v in ratio.values())
