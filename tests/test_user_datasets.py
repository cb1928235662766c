"""Issue 14, part 2: your own dataset, described in TOML (an .npz of uint8 images and labels, or a
torchvision ImageFolder root) or registered by a plugin (``ensemble_bench.userdata.register_dataset``).

Everything runs on tiny generated data in the test's folder (60 8x8 RGB images in 3 classes): loading
through the TOML (npz, a test_fraction hold-out, ImageFolder PNGs written by PIL), 1-epoch runs through
``ensemble_bench.cli.main`` that write complete records, bad input as one line and exit code 2 with
nothing written, and run ids that follow the data (different data: different id; the same files
elsewhere: the same id)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ensemble_bench import data, userdata
from ensemble_bench.cli import main
from ensemble_bench.resolve import make_run_config
from ensemble_bench.errors import UsageError

# The tiny datasets (54 training images) with the shared batch 128 train one full-batch step an epoch, which
# resolve.check_batch_fits says in a warning (its own test: test_bad_input.py); expected here, not noise.
pytestmark = pytest.mark.filterwarnings("ignore:batch_size 128 is larger than the training split:UserWarning")

N, S, C, K = 60, 8, 3, 3
SPEC = """\
name = "tiny"
num_classes = 3
image_size = 8
channels = 3
train = "train.npz"
test = "test.npz"
[augment]
crop_padding = 1
hflip = true
[ood]
noise = "noise.npz"
"""


def make_npz_dataset(folder: Path, spec: str = SPEC, seed: int = 0, **arrays) -> Path:
    """``folder`` with train.npz (60 images), test.npz (30), noise.npz (20 OOD) and ``mydata.toml``;
    ``arrays`` replaces any of x_train, y_train, x_test, y_test, x_noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = {"x_train": rng.integers(0, 256, (N, S, S, C), dtype=np.uint8), "y_train": np.arange(N) % K,
         "x_test": rng.integers(0, 256, (N // 2, S, S, C), dtype=np.uint8), "y_test": np.arange(N // 2) % K,
         "x_noise": rng.integers(0, 256, (20, S, S, C), dtype=np.uint8)}
    a.update(arrays)
    np.savez(folder / "train.npz", x=a["x_train"], y=a["y_train"])
    np.savez(folder / "test.npz", x=a["x_test"], y=a["y_test"])
    np.savez(folder / "noise.npz", x=a["x_noise"])
    (folder / "mydata.toml").write_text(spec)
    return folder / "mydata.toml"


def make_imagefolder(root: Path, classes=("ant", "bee", "cat"), per_class: int = 8, size=(10, 12),
                     test_classes=("bee", "cat")) -> None:
    """root/train/<class>/*.png and root/test/<class>/*.png (non-square RGB PNGs, so they are resized and
    centre-cropped); the test folder lacks the first class, so its labels must follow train's names."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for part, names in (("train", classes), ("test", test_classes)):
        for cl in names:
            d = root / part / cl
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def run_args(dataset: str, out: str = "out", *extra: str) -> list[str]:
    return ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", dataset, "--epochs", "1",
            "--batch-size", "16", "--lr", "0.05", "--device", "cpu", "--no-progress", "--out", out, *extra]


def config(dataset, **kw):
    return make_run_config({"method": "single", "backbone": "cnn_small", "dataset": str(dataset), "epochs": 1,
                            "device": "cpu", **kw})


# ------------------------------------------------------------------------------------------ loading
def test_npz_dataset_loads_as_declared(tmp_path):
    toml = make_npz_dataset(tmp_path / "ds", SPEC.replace("channels = 3\n", "channels = 3\nmean = [0.5, 0.5, 0.5]\n"
                                                                           "std = [0.25, 0.25, 0.25]\n"))
    b = data.load(str(toml), val_fraction=0.1)
    assert b.name == "tiny" and b.num_classes == K
    assert tuple(b.train.x.shape) == (54, C, S, S) and len(b.val) == 6 and len(b.test) == 30
    assert b.train.x.dtype.is_floating_point is False and b.ood["noise"].shape == (20, C, S, S)
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.25, 0.25, 0.25)
    assert (b.augment.crop_pad, b.augment.flip) == (1, True)
    # the training file is put in a fixed order (not the run seed's): the same every load, every class in val
    assert np.array_equal(b.train.x.numpy(), data.load(str(toml)).train.x.numpy())
    assert set(b.val.y.tolist()) == {0, 1, 2}
    # the harness's tables answer for the TOML without loading arrays
    assert data.NUM_CLASSES[str(toml)] == K and data.IMAGE_SHAPES[str(toml)] == (C, S)
    assert data.OOD_SETS[str(toml)] == ("noise",) and data.OOD_SETS.get("nope") is None
    # shuffle = false keeps the file's order; mean/std default to the training split's
    toml2 = make_npz_dataset(tmp_path / "ds2", SPEC.replace("test = ", "shuffle = false\ntest = "))
    b2 = data.load(str(toml2))
    x = np.load(tmp_path / "ds2" / "train.npz")["x"]
    assert np.array_equal(b2.train.x.numpy(), x[:54].transpose(0, 3, 1, 2))
    assert np.allclose(b2.mean, (x[:54] / 255.0).mean(axis=(0, 1, 2)), atol=1e-5)


def test_test_fraction_is_a_fixed_stratified_hold_out_and_grey_images(tmp_path):
    spec = SPEC.replace('test = "test.npz"', "test_fraction = 0.25").replace("channels = 3", "channels = 1") \
        .replace('[ood]\nnoise = "noise.npz"\n', "")
    rng = np.random.default_rng(3)
    toml = make_npz_dataset(tmp_path / "ds", spec, x_train=rng.integers(0, 256, (N, S, S), dtype=np.uint8))
    b = data.load(str(toml), val_fraction=0.0)
    assert len(b.test) == 15 and len(b.train) == 45 and b.val is None and b.in_channels == 1
    assert np.bincount(b.test.y.numpy()).tolist() == [5, 5, 5]      # stratified: a quarter of each class
    assert np.array_equal(b.test.x.numpy(), data.load(str(toml), val_fraction=0.0).test.x.numpy())
    assert b.ood == {}


def test_imagefolder_dataset_loads_with_train_class_names(tmp_path):
    make_imagefolder(tmp_path / "ds" / "images")
    (tmp_path / "ds" / "img.toml").write_text('name = "folders"\nnum_classes = 3\nimage_size = 8\n'
                                              'format = "imagefolder"\nroot = "images"\n[augment]\nhflip = false\n')
    b = data.load(str(tmp_path / "ds" / "img.toml"), val_fraction=0.125)
    assert tuple(b.train.x.shape) == (21, 3, 8, 8) and len(b.val) == 3 and b.train.x.dtype == data.torch.uint8
    assert sorted(set(b.test.y.tolist())) == [1, 2] and len(b.test) == 16   # bee, cat keep train's labels
    assert (b.augment.crop_pad, b.augment.flip) == (1, False)              # default padding: image_size // 8


def test_registered_dataset_from_a_plugin(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (N, S, S, C), dtype=np.uint8), np.arange(N) % K
    try:
        for _ in range(2):   # the same line twice (a plugin imported again): replaced, not a clash
            spec = userdata.register_dataset("plug_tiny", {"num_classes": K, "image_size": S, "train": (x, y),
                                                       "test_fraction": 0.2, "ood": {"noise": x[:10]}})
        assert spec.name == "plug_tiny" and "plug_tiny" in data.names()
        cfg = config("plug_tiny")
        assert cfg.dataset == "plug_tiny" and cfg.data_id["name"] == "plug_tiny"
        assert data.NUM_CLASSES["plug_tiny"] == K
        with pytest.raises(UsageError, match=r"dataset 'plug_tiny' is registered twice: by .*test_user_datasets.py:\d+.* "
                                             r"and by .*test_user_datasets.py:\d+"):
            userdata.register_dataset("plug_tiny", {"num_classes": K, "image_size": S, "train": (x, y),
                                                "test_fraction": 0.5})
        with pytest.raises(UsageError, match=r"dataset 'cifar10' is registered twice: by ensemble_bench.data \(built-in\)"):
            userdata.register_dataset("cifar10", {"num_classes": K, "image_size": S, "train": (x, y), "test_fraction": 0.5})
        with pytest.raises(UsageError, match=r"labels? .*outside \[0, 3\)"):
            userdata.register_dataset("plug_bad", {"num_classes": K, "image_size": S, "train": (x, y + 1),
                                               "test_fraction": 0.2})
            data.load("plug_bad")
    finally:
        userdata.unregister_dataset("plug_tiny")
        userdata.unregister_dataset("plug_bad")
    assert "plug_tiny" not in data.names()


# ------------------------------------------------------------------------------------- end to end
def _record(out: Path) -> dict:
    recs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(recs) == 1
    return recs[0]


def test_run_on_a_toml_dataset_writes_a_complete_record(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_npz_dataset(tmp_path / "ds")
    assert main(run_args("ds/mydata.toml")) == 0
    rec = _record(tmp_path / "out")
    assert rec["status"] == "complete"
    assert rec["config"]["dataset"] == str((tmp_path / "ds" / "mydata.toml").resolve())
    assert rec["data"]["name"] == "tiny" and rec["data"]["n_test"] == 30 and rec["data"]["image_shape"] == [3, 8, 8]
    assert rec["config"]["data_id"]["spec_sha256"] and rec["config"]["data_id"]["name"] == "tiny"
    assert set(rec["metrics"]["ood"]) == {"noise"} and 0.0 <= rec["metrics"]["acc"] <= 1.0
    # the same experiment from another folder (another spelling of the path) is the same run: skipped
    monkeypatch.chdir(tmp_path / "ds")
    assert main(run_args("mydata.toml", str(tmp_path / "out"))) == 0
    assert "complete record exists" in capsys.readouterr().err
    # cost and list know it too
    assert main(["cost", "--method", "single", "--backbone", "cnn_small", "--dataset", "mydata.toml"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > 0
    assert main(["list"]) == 0 and "FILE.toml" in capsys.readouterr().out
    # the leaderboard shows the dataset's declared name, not the path; evaluate knows its OOD sets
    assert main(["leaderboard", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "### tiny · cnn_small" in table and "mydata.toml" not in table
    assert main(["evaluate", str(tmp_path / "out"), "--ood", "noise", "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "out"), "--ood", "nope"]) == 2
    assert "unknown OOD set 'nope'" in capsys.readouterr().err


def test_run_on_an_imagefolder_dataset_and_quickstart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_imagefolder(tmp_path / "images")
    (tmp_path / "img.toml").write_text('name = "folders"\nnum_classes = 3\nimage_size = 8\nformat = "imagefolder"\n'
                                       'root = "images"\n[ood]\nother = "images/test/bee"\n')
    assert main(run_args("img.toml")) == 0
    rec = _record(tmp_path / "out")
    assert rec["status"] == "complete" and rec["data"]["name"] == "folders" and rec["data"]["ood"] == {"other": 8}
    assert f"{rec['run_id']}: single on cnn_small / folders," in capsys.readouterr().err   # its name, not its path
    assert main(["quickstart", "--dataset", "img.toml", "--methods", "single", "--epochs", "1", "--out", "qs",
                 "--quiet"]) == 0
    assert _record(tmp_path / "qs")["data"]["name"] == "folders"


def test_sweep_spec_takes_a_toml_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_npz_dataset(tmp_path / "ds")
    (tmp_path / "sweep.toml").write_text('name = "mine"\n[grid]\nmethod = ["single"]\ndataset = ["ds/mydata.toml", '
                                         '"digits"]\n[run]\nbackbone = "cnn_small"\nepochs = 1\nout = "runs"\n')
    assert main(["sweep", "sweep.toml", "--dry-run"]) == 0
    assert "mydata.toml" in capsys.readouterr().out + capsys.readouterr().err
    from ensemble_bench.sweep import expand, load_spec

    cfgs = expand(load_spec(tmp_path / "sweep.toml"))
    assert [c.data_id["name"] for c in cfgs] == ["tiny", "digits"]
    assert cfgs[0].dataset == str((tmp_path / "ds" / "mydata.toml").resolve())


# ---------------------------------------------------------------------------------------- run ids
def test_run_id_follows_the_data_not_the_path(tmp_path):
    a = make_npz_dataset(tmp_path / "a")
    rid = config(a).run_id()
    assert rid.startswith("single-") and config(a).identity()["dataset"] == "tiny"
    # the same files (and the same declaration, comments and key order aside) elsewhere: the same id
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    (tmp_path / "copy" / "mydata.toml").write_text("# a copy\nchannels = 3\n" + SPEC.replace("channels = 3\n", ""))
    assert config(tmp_path / "copy" / "mydata.toml").run_id() == rid
    # other arrays, another declared value, another name: another id
    other = {config(make_npz_dataset(tmp_path / "b", seed=1)).run_id(),
             config(make_npz_dataset(tmp_path / "c", SPEC.replace("hflip = true", "hflip = false"))).run_id(),
             config(make_npz_dataset(tmp_path / "d", SPEC.replace('"tiny"', '"tiny2"'))).run_id(),
             config(make_npz_dataset(tmp_path / "e", SPEC.replace("crop_padding = 1", "crop_padding = 2"))).run_id()}
    assert rid not in other and len(other) == 4
    # a file changed in place is other data (the identity cache follows the files' sizes and mtimes)
    import os

    x = np.load(tmp_path / "a" / "train.npz")["x"].copy()
    x[0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "a" / "train.npz", x=x, y=np.arange(N) % K)
    os.utime(tmp_path / "a" / "train.npz", ns=(1, 1))
    assert config(a).run_id() != rid
    # built-in datasets keep their identity (no spec part)
    assert "spec_sha256" not in config("digits").data_id and config("digits").identity()["dataset"] == "digits"


# ------------------------------------------------------------------------------------- bad input
BAD = {   # case: (change to the spec or arrays, words the one line must contain)
    "unknown_key": (lambda s: s.replace("num_classes", "num_clases"), {}, ["unknown key 'num_clases'",
                                                                        "did you mean 'num_classes'"]),
    "val_fraction_key": (lambda s: s.replace("[augment]", "val_fraction = 0.2\n[augment]"), {}, ["unknown key 'val_fraction'", "test_fraction"]),
    "unknown_augment_key": (lambda s: s.replace("hflip", "flip"), {}, ["[augment] key 'flip'", "hflip"]),
    "missing_train_file": (lambda s: s.replace('"train.npz"', '"nope.npz"'), {}, ["train = 'nope.npz'", "not found"]),
    "missing_ood_file": (lambda s: s.replace('"noise.npz"', '"gone.npz"'), {}, ["[ood] noise", "not found"]),
    "wrong_image_size": (lambda s: s, {"x_train": np.zeros((N, 16, 16, C), np.uint8)},
                         ["train.npz", "[N, 8, 8, 3]", "[60, 16, 16, 3]"]),
    "wrong_channels": (lambda s: s, {"x_test": np.zeros((30, S, S, 1), np.uint8)}, ["test.npz", "[N, 8, 8, 3]"]),
    "ood_wrong_size": (lambda s: s, {"x_noise": np.zeros((20, 4, 4, C), np.uint8)}, ["noise.npz", "OOD (noise)"]),
    "float_images": (lambda s: s, {"x_train": np.zeros((N, S, S, C), np.float32)}, ["uint8", "float32"]),
    "labels_out_of_range": (lambda s: s, {"y_train": np.arange(N) % K + 1}, ["train.npz", "outside [0, 3)"]),
    "negative_label": (lambda s: s, {"y_test": -(np.arange(N // 2) % K)}, ["test.npz", "outside [0, 3)"]),
    "float_labels": (lambda s: s, {"y_train": (np.arange(N) % K).astype(float)}, ["labels must be integers"]),
    "label_count": (lambda s: s, {"y_train": np.arange(N - 1) % K}, ["60 training images but 59 labels"]),
    "missing_name": (lambda s: s.replace('name = "tiny"\n', ""), {}, ["missing name"]),
    "builtin_name": (lambda s: s.replace('"tiny"', '"cifar10"'), {}, ["built-in dataset"]),
    "missing_num_classes": (lambda s: s.replace("num_classes = 3\n", ""), {}, ["missing num_classes"]),
    "one_class": (lambda s: s.replace("num_classes = 3", "num_classes = 1"), {}, ["num_classes", ">= 2"]),
    "image_size_text": (lambda s: s.replace("image_size = 8", 'image_size = "8"'), {}, ["image_size", "integer"]),
    "bad_format": (lambda s: s.replace("[augment]", 'format = "imagefoldr"\n[augment]'), {}, ["unknown format", "did you mean 'imagefolder'"]),
    "test_and_fraction": (lambda s: s.replace("test = ", "test_fraction = 0.2\ntest = "), {}, ["keep one"]),
    "no_test": (lambda s: s.replace('test = "test.npz"\n', ""), {}, ["test_fraction"]),
    "mean_without_std": (lambda s: s.replace("channels = 3\n", "channels = 3\nmean = [0.5, 0.5, 0.5]\n"), {},
                         ["mean is set without std"]),
    "std_length": (lambda s: s.replace("channels = 3\n", "channels = 3\nmean = [0.5, 0.5, 0.5]\nstd = [0.2]\n"), {},
                   ["std must be a list of 3 numbers"]),
    "std_zero": (lambda s: s.replace("channels = 3\n", "channels = 3\nmean = [0.5, 0.5, 0.5]\nstd = [0.2, 0, 0.2]\n"),
                 {}, ["std must be > 0"]),
    # torchvision's 0-255 statistics: refused, not trained at chance
    "mean_0_255": (lambda s: s.replace("channels = 3\n", "channels = 3\nmean = [125.3, 123.0, 113.9]\n"
                                                          "std = [0.25, 0.25, 0.25]\n"), {},
                   ["mean = [125.3, 123.0, 113.9] is outside [0, 1]", "0-255 units?"]),
    "std_0_255": (lambda s: s.replace("channels = 3\n", "channels = 3\nmean = [0.5, 0.5, 0.5]\n"
                                                         "std = [63.0, 62.1, 66.7]\n"), {},
                  ["std = [63.0, 62.1, 66.7] is outside (0, 1]", "0-255 units?"]),
    "mean_negative": (lambda s: s.replace("channels = 3\n", "channels = 3\nmean = [0.5, -0.1, 0.5]\n"
                                                             "std = [0.25, 0.25, 0.25]\n"), {},
                      ["mean = [0.5, -0.1, 0.5] is outside [0, 1]"]),
    "crop_too_big": (lambda s: s.replace("crop_padding = 1", "crop_padding = 9"), {}, ["crop_padding"]),
    "ood_name": (lambda s: s.replace("noise =", '"no ise" ='), {}, ["OOD set name 'no ise'"]),
    "toml_syntax": (lambda s: s + "this is not toml\n", {}, ["cannot parse", "mydata.toml"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dataset_is_one_line_exit_2_nothing_written(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    edit, arrays, words = BAD[case]
    make_npz_dataset(tmp_path / "ds", edit(SPEC), **arrays)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(run_args("ds/mydata.toml")) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble-bench: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("case", ["no_file", "a_folder", "unknown_name", "imagefolder_classes", "imagefolder_no_test",
                                  "imagefolder_train_key", "not_an_image", "cost_unknown", "quickstart_missing"])
def test_more_bad_datasets(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, words = run_args("ds/none.toml"), ["dataset file not found: ds/none.toml"]
    if case == "a_folder":
        (tmp_path / "dir.toml").mkdir()
        args, words = run_args("dir.toml"), ["a folder"]
    elif case == "unknown_name":
        args, words = run_args("digit"), ["unknown dataset 'digit'", "did you mean 'digits'", ".toml"]
    elif case.startswith("imagefolder") or case == "not_an_image":
        make_imagefolder(tmp_path / "images", test_classes=("bee", "dog") if case == "imagefolder_classes" else ("bee",))
        spec = 'name = "f"\nnum_classes = 3\nimage_size = 8\nformat = "imagefolder"\nroot = "images"\n'
        words = ["class folder 'dog' is not among the training classes"]
        if case == "imagefolder_no_test":
            shutil.rmtree(tmp_path / "images" / "test")
            words = ["no test/ folder", "test_fraction"]
        elif case == "imagefolder_train_key":
            spec += 'train = "x.npz"\n'
            words = ['train is for format = "npz"']
        elif case == "not_an_image":
            (tmp_path / "images" / "train" / "ant" / "bad.png").write_bytes(b"not a png")
            words = ["cannot read image", "bad.png"]
        (tmp_path / "img.toml").write_text(spec)
        args = run_args("img.toml")
    elif case == "cost_unknown":
        args, words = ["cost", "--method", "single", "--backbone", "cnn_small", "--dataset", "nope.toml"], ["not found"]
    elif case == "quickstart_missing":
        args, words = ["quickstart", "--dataset", "nope.toml", "--methods", "single", "--out", "qs"], ["not found"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble-bench: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_builtin_npz_of_the_wrong_size_is_refused(tmp_path):
    """A 16x16 cifar10_train.npz is refused in one line, not trained as if it were CIFAR-10 (the CLI
    cases are in tests/test_bad_input.py)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar10_train.npz", x_train=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8),
             y_train=np.arange(20) % 10)
    np.savez(tmp_path / "cifar10_test.npz", x_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(10) % 10)
    with pytest.raises(UsageError, match=r"cifar10_train.npz: training images must be uint8 \[N, 32, 32, 3\] for "
                                         r"cifar10; got uint8 \[20, 16, 16, 3\]"):
        data.load("cifar10", tmp_path)


def test_plugin_file_registers_a_dataset_for_run(tmp_path, monkeypatch, capsys):
    """A plugin (a .py file outside the package) names a TOML dataset; the TOML path in it is relative
    to the plugin file, so it works from any folder."""
    make_npz_dataset(tmp_path / "plug", SPEC.replace('"tiny"', '"plugged"'))
    (tmp_path / "plug" / "myplugin.py").write_text(
        'from ensemble_bench import register_dataset\n\nregister_dataset("plugged", "mydata.toml")\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    try:
        assert main(run_args("plugged", "out", "--plugin", str(tmp_path / "plug" / "myplugin.py"))) == 0
        rec = _record(tmp_path / "elsewhere" / "out")
        assert rec["status"] == "complete" and rec["config"]["dataset"] == "plugged"
        assert rec["data"]["name"] == "plugged" and set(rec["metrics"]["ood"]) == {"noise"}
        # the same data as a TOML path is the same experiment (same name, settings and arrays): same run id
        assert config(tmp_path / "plug" / "mydata.toml", batch_size=16, lr=0.05).run_id() == rec["run_id"]
    finally:
        userdata.unregister_dataset("plugged")
