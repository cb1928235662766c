import subprocess
import sys

import pytest

from ensemble_bench.resolve import make_run_config, run_config_from_toml
from ensemble_bench.errors import UsageError

BASE = {"method": "deep_ensemble", "backbone": "cnn_small", "dataset": "digits", "epochs": 3, "seed": 1}


def test_run_id_pinned_stable_literal():
    # computed once; a change here means every existing result folder loses its ids
    cfg = make_run_config(dict(BASE, options={"num_members": 2}))
    assert cfg.run_id() == PINNED


def test_run_id_stable_across_processes():
    code = ("from ensemble_bench.resolve import make_run_config;"
            f"print(make_run_config({dict(BASE, options={'num_members': 2})!r}).run_id())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == PINNED


def test_defaults_typed_out_and_key_order_do_not_change_the_id():
    a = make_run_config(dict(BASE, options={}))
    b = make_run_config(dict(BASE, options={"num_members": 4, "batched": False}))
    c = make_run_config(dict(reversed(list(dict(BASE, options={"batched": "false", "num_members": "4"}).items()))))
    assert a.run_id() == b.run_id() == c.run_id()


@pytest.mark.parametrize("change", [{"seed": 2}, {"epochs": 4}, {"lr": 0.05}, {"options": {"num_members": 3}},
                                    {"backbone": "resnet20"}, {"method": "single", "options": {}}])
def test_any_changed_setting_changes_the_id(change):
    assert make_run_config(dict(BASE, **change)).run_id() != make_run_config(BASE).run_id()


def test_paths_and_device_do_not_enter_the_id():
    a = make_run_config(dict(BASE, out="x", data_dir="/d", device="cpu"))
    assert a.run_id() == make_run_config(BASE).run_id()


@pytest.mark.parametrize("values,msg", [
    ({"method": "nope"}, "unknown method 'nope'; choose from"),
    ({"backbone": "vgg"}, "unknown backbone"),
    ({"dataset": "mnist"}, "unknown dataset"),
    ({"options": {"bogus": 1}}, "unknown option 'bogus' for method 'deep_ensemble'; valid options: num_members"),
    ({"options": {"num_members": "two"}}, "bad value for deep_ensemble.num_members"),
    ({"options": {"num_members": 0}}, "num_members must be >= 1"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"schedule": "step"}, "unknown schedule"),
    ({"lr": "fast"}, "bad value for lr"),
])
def test_bad_values_are_one_line_usage_errors(values, msg):
    with pytest.raises(UsageError) as e:
        make_run_config(dict(BASE, **values))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_toml_config(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('method = "deep_ensemble"\nbackbone = "cnn_small"\ndataset = "digits"\nepochs = 3\nseed = 1\n'
                 '[options]\nnum_members = 2\n')
    assert run_config_from_toml(p).run_id() == PINNED
    p.write_text("method = [")
    with pytest.raises(UsageError, match="cannot parse"):
        run_config_from_toml(p)
    with pytest.raises(UsageError, match="not found"):
        run_config_from_toml(tmp_path / "missing.toml")


PINNED = "deep_ensemble-9960b8a16e5ee348"


def test_config_is_plain_data():
    # config.py holds the run's fields and its id; the registries, the data and torch sit above it
    # (ensemble_bench.resolve): importing it and building a RunConfig loads none of them
    code = ("import sys; from ensemble_bench.config import RunConfig; RunConfig(method='single');"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(("
            "'ensemble_bench.methods', 'ensemble_bench.data', 'ensemble_bench.backbones', 'ensemble_bench.runner'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
