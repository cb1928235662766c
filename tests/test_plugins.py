"""The open suite: one import name, plugins (files, modules, entry points), a registry that fails loudly
and stays usable, plugin backbones, staged-backbone refusals, and the example plugin end to end."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ensemble_bench
import ensemble_bench.methods as methods
from ensemble_bench import backbones, plugins
from ensemble_bench.cli import main
from ensemble_bench.errors import UsageError
from ensemble_bench.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "temperature_scaling.py"
TINY = ["--backbone", "cnn_small", "--dataset", "digits", "--epochs", "2", "--no-progress"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _forget_method_modules(monkeypatch, *also: str) -> None:
    """Drop the method modules (and modules starting with ``also``) from sys.modules so that loading the
    registry imports them again; the test's end restores them. The packages' attributes that name them are
    restored too: without that, ``ensemble_bench.methods.deep_ensemble`` stays the copy imported here while
    the restored registry holds the original's classes, and a later test that patches the module patches the
    copy (test_deep_ensemble's batched-loss control then saw no change). Call it after ``methods.names()``
    has loaded the real registry (before the test swaps it), so that every module dropped here is one the
    test's end puts back, not one left behind that is registered nowhere."""
    for mod in [m for m in sys.modules if m.startswith(("ensemble_bench.methods.", *also))]:
        parent, _, child = mod.rpartition(".")
        if parent in sys.modules and hasattr(sys.modules[parent], child):
            monkeypatch.setattr(sys.modules[parent], child, getattr(sys.modules[parent], child))
        monkeypatch.delitem(sys.modules, mod)


# ------------------------------------------------------------------------- one import name
def test_public_api_and_no_collision_with_a_users_own_packages(tmp_path):
    for name in ensemble_bench.__all__:
        assert getattr(ensemble_bench, name) is not None
    with pytest.raises(AttributeError):
        ensemble_bench.no_such_thing  # noqa: B018
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "__init__.py").write_text("")      # a user's own `methods` and `benchmark`
    (tmp_path / "benchmark").mkdir()
    (tmp_path / "benchmark" / "__init__.py").write_text("raise ImportError('not the suite')")
    r = subprocess.run([sys.executable, "-m", "ensemble_bench", "list"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "deep_ensemble" in r.stdout and "resnet8" in r.stdout


# ------------------------------------------------------------------------------- registry
def test_registry_duplicates_name_both_sources_and_unknown_names_suggest():
    reg = Registry("thing")

    class A:
        pass

    class B:
        pass

    reg.add("a", A)
    reg.add("a", A)                                             # the same object again: fine
    with pytest.raises(UsageError, match=r"registered twice: by .*test_plugins.* and by .*test_plugins"):
        reg.add("a", B)
    with pytest.raises(UsageError, match=r"unknown thing 'b'; choose from a"):
        reg.get("b")
    with pytest.raises(UsageError, match="did you mean 'single'"):
        methods.get("singel")


def test_a_broken_method_file_is_reported_and_the_others_still_load(monkeypatch):
    import importlib

    real = importlib.import_module

    def flaky(name, *a, **k):
        if name == "ensemble_bench.methods.mimo":
            raise ZeroDivisionError("broken on purpose")
        return real(name, *a, **k)

    methods.names()   # the real registry loaded first (see _forget_method_modules)
    monkeypatch.setattr(methods, "REGISTRY", Registry("method"))
    monkeypatch.setattr(methods, "_state", "new")
    monkeypatch.setattr(methods, "_errors", {})
    _forget_method_modules(monkeypatch)
    monkeypatch.setattr(importlib, "import_module", flaky)
    names = methods.names()
    assert "mimo" not in names and {"single", "deep_ensemble", "packed"} <= set(names)
    assert methods.load_errors() == {"ensemble_bench.methods.mimo": "ZeroDivisionError: broken on purpose"}
    with pytest.raises(UsageError, match="failed to import: ensemble_bench.methods.mimo: ZeroDivisionError"):
        methods.get("mimo")


def test_entry_point_plugins_load_and_a_failing_one_is_reported(monkeypatch, tmp_path):
    from importlib.metadata import EntryPoint

    _write(tmp_path / "ep_good.py", """
        from ensemble_bench import register
        from ensemble_bench.methods.single import Single

        @register("ep_method")
        class EpMethod(Single):
            pass
    """)
    _write(tmp_path / "ep_bad.py", "raise RuntimeError('no luck')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint("good", "ep_good", plugins.ENTRY_POINT_GROUP), EntryPoint("bad", "ep_bad", plugins.ENTRY_POINT_GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [e for e in eps if e.group == group])
    methods.names()   # the real registry loaded first (see _forget_method_modules)
    monkeypatch.setattr(methods, "_state", "new")
    monkeypatch.setattr(methods, "_errors", {})
    monkeypatch.setattr(methods, "REGISTRY", Registry("method"))
    _forget_method_modules(monkeypatch, "ep_")
    assert "ep_method" in methods.names() and "single" in methods.names()
    assert methods.load_errors() == {"entry point bad = ep_bad": "RuntimeError: no luck"}


# -------------------------------------------------------------------------------- plugins
def test_bad_plugins_are_one_line(capsys, tmp_path):
    broken = _write(tmp_path / "broken.py", "x = 1 / 0\n")
    dup = _write(tmp_path / "dup.py", """
        from ensemble_bench import Method, register

        @register("single")
        class NotSingle(Method):
            pass
    """)
    cases = [
        (["list", "--plugin", str(broken)], "failed to import: ZeroDivisionError: division by zero"),
        (["list", "--plugin", str(tmp_path / "missing.py")], "plugin file not found"),
        (["list", "--plugin", "no_such_package_xyz.mod"], "failed to import: ModuleNotFoundError"),
        (["list", "--plugin", "not a module"], "neither a .py file nor a module name"),
        (["list", "--plugin", str(dup)], "method 'single' is registered twice: by ensemble_bench.methods.single"),
    ]
    for argv, msg in cases:
        rc, out, err = _cli(capsys, *argv)
        assert rc == 2 and msg in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_staged_only_methods_refuse_plain_backbones_before_any_work(capsys, tmp_path):
    for method in ("packed", "nfe", "bridge", "batch_ensemble", "mc_dropout"):
        rc, _, err = _cli(capsys, "run", "--method", method, "--backbone", "timm:resnet18", "--dataset", "cifar10",
                          "--data-dir", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "runs"))
        assert rc == 2 and f"{method} needs a staged backbone (" in err and "resnet8" in err, err
    rc, _, err = _cli(capsys, "run", "--method", "deep_ensemble", "--set", "batched=true", "--backbone", "timm:resnet18",
                      "--dataset", "digits", "--out", str(tmp_path / "runs"))
    assert rc == 2 and "needs a staged backbone (batched=true" in err
    assert not (tmp_path / "runs").exists()
    rc, out, _ = _cli(capsys, "list")
    assert "backbones: staged only (rebuilds every conv and linear layer as grouped layers)" in out
    assert "resnet8" in out and "timm:<name>" in out


def test_plugin_backbones_plain_and_staged(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(backbones, "PLUGINS", Registry("backbone"))
    plugin = _write(tmp_path / "my_backbones.py", """
        from torch import nn
        from ensemble_bench import register_backbone
        from ensemble_bench.backbones import cnn_small

        @register_backbone("tiny_mlp", summary="flatten + one hidden layer")
        def tiny_mlp(num_classes, in_channels, layers):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 32), nn.ReLU(), nn.Linear(32, num_classes))

        @register_backbone("my_staged", staged=True)
        def my_staged(num_classes, in_channels, layers):
            return cnn_small(num_classes, in_channels, layers)
    """)
    rc, out, _ = _cli(capsys, "list", "--plugin", str(plugin))
    assert rc == 0 and "tiny_mlp" in out and "plain, from" in out and "my_staged" in out
    rc, out, err = _cli(capsys, "cost", "--plugin", str(plugin), "--method", "packed", "--backbone", "my_staged",
                        "--num-classes", "10", "--in-channels", "1", "--image-size", "8")
    assert rc == 0, err
    rc, out, err = _cli(capsys, "cost", "--plugin", str(plugin), "--method", "packed", "--backbone", "tiny_mlp",
                        "--num-classes", "10", "--in-channels", "1", "--image-size", "8")
    assert rc == 2 and "packed needs a staged backbone" in err and "my_staged" in err
    rc, out, err = _cli(capsys, "run", "--plugin", str(plugin), "--method", "single", *TINY[2:],
                        "--backbone", "tiny_mlp", "--dataset", "digits", "--out", "runs")
    assert rc == 0, err
    rec = json.loads(next(Path("runs").glob("single-*.json")).read_text())
    assert rec["config"]["backbone"] == "tiny_mlp" and rec["code"]["plugins"][0]["spec"] == str(plugin)


@pytest.mark.slow
def test_example_plugin_end_to_end(capsys, tmp_path, monkeypatch):
    """The example (temperature scaling) as a user runs it: its record names its source, it reuses the
    single model of the same seed, keeps the accuracy and lowers the validation NLL."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(capsys, "run", "--method", "single", *TINY, "--out", "runs")
    assert rc == 0, err
    rc, out, err = _cli(capsys, "run", "--plugin", str(EXAMPLE), "--method", "temperature_scaling", *TINY, "--out", "runs")
    assert rc == 0, err
    single = json.loads(next(Path("runs").glob("single-*.json")).read_text())
    ts = json.loads(next(Path("runs").glob("temperature_scaling-*.json")).read_text())
    assert ts["code"]["method_path"] == str(EXAMPLE) and len(ts["code"]["method_sha256"]) == 16
    assert ts["code"]["plugins"] == [{"spec": str(EXAMPLE), "module": ts["code"]["method_module"],
                                      "sha256": plugins.file_sha256(EXAMPLE)}]
    assert ts["training"]["reused_stages"], "the single model of the same seed is reused, not retrained"
    assert ts["metrics"]["acc"] == single["metrics"]["acc"]
    info = ts["method"]["info"]
    assert info["temperature"] > 0 and info["val_nll_after"] <= info["val_nll_before"]
    rc, out, _ = _cli(capsys, "leaderboard", "runs")
    assert rc == 0 and "temperature_scaling" in out


def test_example_plugin_without_a_validation_split_is_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    """The example fits T on the validation split: --val-fraction 0 is refused by its build (which the runner
    calls on the meta device before anything trains), not after training with a traceback."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli(capsys, "run", "--plugin", str(EXAMPLE), "--method", "temperature_scaling", *TINY,
                        "--val-fraction", "0", "--out", "runs")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--val-fraction > 0" in err
    assert not Path("runs").exists()


def test_fit_temperature_minimises_nll():
    import torch

    mod = plugins.load(str(EXAMPLE))
    module = sys.modules[mod["module"]]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    logits = torch.randn(400, 5, generator=g) + 3.0 * torch.nn.functional.one_hot(y, 5)
    t = module.fit_temperature(logits * 4.0, y)                  # over-confident logits: T > 1
    nll = lambda tt: float(torch.nn.functional.cross_entropy(logits.double() * 4.0 / tt, y))  # noqa: E731
    assert t > 1.0 and nll(t) <= min(nll(t * 0.9), nll(t * 1.1), nll(1.0))


def test_sweep_carries_plugins_to_its_runs(tmp_path, monkeypatch):
    from ensemble_bench import sweep

    monkeypatch.chdir(tmp_path)
    spec = _write(tmp_path / "s.toml", f"""
        [grid]
        method = ["single", "temperature_scaling"]
        [run]
        plugins = ["{EXAMPLE}"]
        backbone = "cnn_small"
        dataset = "digits"
        epochs = 1
        out = "runs"
    """)
    runs = sweep.expand(sweep.load_spec(spec))
    assert [r.method for r in runs] == ["single", "temperature_scaling"]
    assert all(r.plugins == (str(EXAMPLE),) for r in runs)
    job = sweep.RunJob(runs[1].to_dict(), runs[1].run_id())
    assert job.config["plugins"] == [str(EXAMPLE)]


def test_a_model_that_returns_fewer_members_than_it_declares_fails_its_run(capsys, tmp_path, monkeypatch):
    """num_members is what the record's M, the leaderboard and the DEE curve read: a method (a plugin's, most
    likely) whose forward returns another number of members fails its run, never a record of the wrong M."""
    cls = methods.get("deep_ensemble")
    fit = cls.fit

    def liar(self, ctx):
        model = fit(self, ctx)
        model.num_members = 4          # declares 4, returns 2
        return model

    monkeypatch.setattr(cls, "fit", liar)
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(capsys, "run", "--method", "deep_ensemble", "--set", "num_members=2", *TINY[:4], "--epochs",
                      "1", "--out", "runs")
    assert rc == 1 and err.strip().splitlines()[-1].startswith("ensemble-bench: error: method 'deep_ensemble' "
                                                                "declares 4 members (num_members) but its forward returns 2")
    assert "Traceback" not in err
    (rec,) = [json.loads(p.read_text()) for p in Path("runs").glob("*.json")]
    assert rec["status"] == "failed" and "declares 4 members" in rec["error"]
