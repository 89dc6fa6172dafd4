"""Data sets from files (.csv, .npz, .pt) and the synthetic set; bad files give a DataError
that names the file and the problem."""

import numpy as np
import pytest
import torch

from unison.data import prepare
from unison.errors import ConfigError, DataError


def write(path, text):
    path.write_text(text)
    return str(path)


def test_csv_label_column_by_name_or_last(tmp_path):
    path = write(tmp_path / "a.csv", "a,kind,b\n" + "".join(f"{i},{i % 3},{i / 2}\n" for i in range(30)))
    last = prepare(path, val=0.0)  # default: the last column, b, holds non-integers: regression
    assert last.task == "regression" and torch.equal(last.y, torch.arange(30) / 2) and last.features == 2
    by_name = prepare(path, label="kind", val=0.0)
    assert by_name.task == "classification" and by_name.num_classes == 3 and by_name.features == 2
    assert torch.equal(by_name.y, torch.arange(30) % 3)
    raw_a = torch.arange(30.0)  # features a and b, standardised
    assert torch.allclose(by_name.x[:, 0], (raw_a - raw_a.mean()) / raw_a.std(), atol=1e-5)


def test_csv_text_labels_become_sorted_classes_and_standardisation_uses_the_training_split(tmp_path):
    names = ["virginica", "setosa", "versicolor"]
    rows = "".join(f"{i},{10 * i},{names[i % 3]}\n" for i in range(40))
    data = prepare(write(tmp_path / "flowers.csv", "x1,x2,species\n" + rows), val=0.25, seed=1)
    assert data.num_classes == 3 and len(data.x_val) == 10
    assert set(data.y.tolist()) == {0, 1, 2}  # setosa 0, versicolor 1, virginica 2
    assert torch.allclose(data.x.mean(0), torch.zeros(2), atol=1e-5)  # fitted on training rows only
    assert data.x_val.mean(0).abs().max() > 1e-3
    assert data.name.endswith("flowers.csv")


def test_csv_float_labels_mean_regression(tmp_path):
    data = prepare(write(tmp_path / "r.csv", "x,y\n" + "".join(f"{i},{i / 4}\n" for i in range(20))), val=0.0)
    assert data.task == "regression" and data.y.dtype == torch.float32


@pytest.mark.parametrize("text, label, words", [
    ("", None, ["empty"]),
    ("a,b,c\n", None, ["header but no data rows"]),
    ("a,b,c\n1,2,0\n3,4\n", None, ["row 3 has 2 fields", "header has 3"]),
    ("a,b,c\n1,2,0\n3,x,1\n", None, ["row 3", "column 'b'", "'x' is not a number"]),
    ("a,b,c\n1,,0\n", None, ["row 2", "column 'b'", "'' is not a number"]),
    ("a,b,c\n1,2,0\n", "species", ["no label column 'species'", "columns: a, b, c"]),
    ("a,b,c\n1,2,\n", None, ["row 2 has no value in label column 'c'"]),
    ("a\n1\n", None, ["at least one feature"]),
])
def test_bad_csv_files(tmp_path, text, label, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        prepare(str(path), label=label)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_npz_and_pt_files(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 4
    np.savez(tmp_path / "d.npz", X=x, y=y)
    from_npz = prepare(str(tmp_path / "d.npz"), val=0.25)
    assert from_npz.num_classes == 4 and from_npz.features == 3 and len(from_npz.x_val) == 10
    torch.save({"X": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), tmp_path / "pair.pt")
    for name in ("d.pt", "pair.pt"):
        from_pt = prepare(str(tmp_path / name), val=0.25)
        assert torch.equal(from_pt.x, from_npz.x) and torch.equal(from_pt.y_val, from_npz.y_val)


def test_bad_npz_and_pt_files(tmp_path):
    np.savez(tmp_path / "noy.npz", X=np.zeros((4, 2)), labels=np.zeros(4))
    np.savez(tmp_path / "text.npz", X=np.array([["a", "b"]] * 4), y=np.zeros(4))
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    torch.save({"features": torch.zeros(3)}, tmp_path / "keys.pt")
    (tmp_path / "empty.npz").write_bytes(b"")
    cases = {"noy.npz": ["no array 'y'", "found: X, labels"], "text.npz": ["array X", "dtype <U1"],
             "junk.npz": ["not a readable .npz"], "keys.pt": ["dict with keys ['features']", "'X' and 'y'"],
             "empty.npz": ["the file is empty"], "missing.csv": ["does not exist"],
             "data.txt": ["not accepted", ".csv, .npz or .pt"]}
    for name, words in cases.items():
        with pytest.raises(DataError) as info:
            prepare(str(tmp_path / name))
        for word in [name if name != "data.txt" else "data.txt"] + words:
            assert word in str(info.value), str(info.value)


def test_label_only_for_csv_files(tmp_path):
    with pytest.raises(DataError, match="names a column of a .csv file"):
        prepare("digits", label="y")


def test_synthetic_options():
    data = prepare("synthetic(samples=300, features=6, classes=3)")
    assert data.features == 6 and data.num_classes == 3 and len(data.x) + len(data.x_val) == 300
    assert torch.equal(prepare("synthetic(samples=300, features=6, classes=3)").x, data.x)  # reproducible
    for spec, words in [("synthetic(rows=5)", ["'rows=5'", "samples, features, classes"]),
                        ("synthetic(classes=x)", ["synthetic.classes='x'", "integer"]),
                        ("synthetic(classes=1)", ["synthetic.classes=1", ">= 2"]),
                        ("synthetic(features=2, classes=8)", ["8 classes need more than 2 features"])]:
        with pytest.raises(DataError) as info:
            prepare(spec)
        for word in words:
            assert word in str(info.value), str(info.value)


def test_run_file_label_setting(tmp_path):
    from unison import config

    with pytest.raises(ConfigError, match="data.label"):
        config.DataConfig(label="")
    assert config.from_dict({"data": {"dataset": "x.csv", "label": "kind"}}).data.label == "kind"
