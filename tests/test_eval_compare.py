"""eval.compare: results of several runs become one table (markdown, CSV) and two plots, optionally in W&B."""

import csv
import json

import pytest
from matplotlib.image import imread

from eval.common import EvalError
from eval.compare import main
from eval.passkey import main as passkey_main
from eval.perplexity import main as perplexity_main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Three training-free tiny-llama runs, each with perplexity and passkey results in its own folder."""
    from data.corpus import load_corpus

    out = tmp_path_factory.mktemp("results")
    text = tmp_path_factory.mktemp("data") / "excerpt.txt"
    text.write_text(load_corpus("heldout")[0].text[:3000])
    common = ["--model", "tiny-llama", "--rope", "none,linear,yarn", "--factor", "2", "--out", str(out)]
    perplexity_main(common + ["--lengths", "256,512,1024", "--mode", "truncate", "--data", str(text)])
    passkey_main(common + ["--lengths", "512,1024", "--depths", "0,1", "--trials", "1"])
    return out


def test_table_and_plots_over_three_result_folders(results, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    folders = sorted(str(p) for p in results.iterdir())
    assert len(folders) == 3
    out = tmp_path / "cmp"
    table = main([*folders, "--out", str(out), "--wandb", "--wandb-project", "test"])

    assert table["columns"] == ["run", "model", "method", "factor", "fine_tuned", "ppl_mode", "ppl@256", "ppl@512",
                                "ppl@1024", "passkey@512", "passkey@1024", "passkey_all"]
    rows = {r[2]: dict(zip(table["columns"], r)) for r in table["rows"]}
    assert set(rows) == {"none", "linear", "yarn"}
    for folder in folders:  # every number in the table is the one in the run's result files
        ppl = json.loads((results / folder / "perplexity.json").read_text())
        pk = json.loads((results / folder / "passkey.json").read_text())
        row = rows[ppl["model"]["method"]]
        assert [row[f"ppl@{L}"] for L in (256, 512, 1024)] == [ppl["ppl"][str(L)] for L in (256, 512, 1024)]
        assert row["passkey_all"] == pk["accuracy"] and row["fine_tuned"] is False

    with open(out / "compare.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["method"] for r in csv_rows] == [r[2] for r in table["rows"]]
    assert float(csv_rows[0]["ppl@512"]) == pytest.approx(table["rows"][0][7], rel=1e-12)
    md = (out / "compare.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 4
    assert "| linear x2 | tiny-llama | linear | 2 | no | truncate |" in md
    assert "- truncate:" in md and "- passkey:" in md  # the definitions travel with the numbers

    ppl_png, pk_png = imread(out / "perplexity.png"), imread(out / "passkey.png")
    assert ppl_png.shape[0] > 200 and pk_png.shape[1] > 2 * pk_png.shape[0]  # three heatmaps side by side
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "wandb_dir" in table


def test_parent_folder_and_single_files_are_accepted(results, tmp_path):
    by_parent = main([str(results), "--out", str(tmp_path / "a")])
    assert len(by_parent["rows"]) == 3
    one = next(results.iterdir())
    only_ppl = main([str(one / "perplexity.json"), "--out", str(tmp_path / "b")])
    assert len(only_ppl["rows"]) == 1 and not any(c.startswith("passkey") for c in only_ppl["columns"])
    assert not (tmp_path / "b" / "passkey.png").exists() and (tmp_path / "b" / "perplexity.png").exists()
    assert not (tmp_path / "b" / "ruler.png").exists()


def test_run_folders_are_searched_where_train_writes_their_results(results, tmp_path):
    import shutil

    runs = []
    for i, folder in enumerate(sorted(results.iterdir())[:2]):
        run = tmp_path / f"run{i}"
        shutil.copytree(folder, run / "eval" / folder.name)  # train.py: <run>/eval/<model slug>/
        runs.append(str(run))
    assert len(main(runs + ["--out", str(tmp_path / "c")])["rows"]) == 2


def test_bad_inputs(results, tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match=r"holds no result file \(perplexity.json, passkey.json, ruler.json"):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    one = next(results.iterdir())
    copy = tmp_path / "copy.json"
    copy.write_text((one / "perplexity.json").read_text())
    with pytest.raises(EvalError, match="two perplexity results"):
        main([str(one), str(copy), "--out", str(tmp_path / "o")])
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(EvalError, match="not a result file"):
        main([str(tmp_path / "junk.json"), "--out", str(tmp_path / "o")])
