import json

import pytest
from PIL import Image

from vaekit.cli.main import main


def test_unknown_set_key_fails_and_names_valid_keys(capsys):
    assert main(["train", "--set", "train.learning_rate=1e-3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "valid keys" in err and "train.lr" in err


def test_wrong_type_fails(capsys):
    assert main(["train", "--set", "train.epochs=many", "--dry-run"]) == 2
    assert "train.epochs must be an integer" in capsys.readouterr().err


def test_dry_run_prints_resolved_config(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  latent_dim: 7\n")
    assert main(["train", str(cfg), "--set", "train.lr=2e-4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "latent_dim: 7" in out and "lr: 0.0002" in out


def test_train_evaluate_sample_reconstruct_end_to_end(tmp_path, capsys, mnist):
    sets = [f"out_dir={tmp_path}", "name=e2e", "data.train_subset=1024", "data.test_subset=256",
            "train.max_steps=24", "train.batch_size=64", "train.progress=false", "train.tensorboard=off",
            "model.hidden_sizes=[64]", "model.latent_dim=4"]
    argv = ["train"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    run = tmp_path / "e2e"
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["latent_dim"] == 4 and (run / "config.yaml").is_file()

    assert main(["evaluate", str(run)]) == 0
    report = json.loads((run / "eval.json").read_text())
    m = report["metrics"]
    assert m["n"] == 10000 and abs(m["neg_elbo"] - (m["recon"] + m["kl"])) < 1e-6

    assert main(["sample", str(run / "model"), "-n", "16", "-o", str(tmp_path / "s.png")]) == 0
    img = Image.open(tmp_path / "s.png")
    assert img.size == ((4 * 30 + 2) * 2, (4 * 30 + 2) * 2)
    assert main(["reconstruct", str(run), "-n", "8", "-o", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").size[1] == (2 * 30 + 2) * 2

    assert main(["sample", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_checkpoints_verb_lists_history_and_fallback(tmp_path, capsys, mnist):
    sets = [f"out_dir={tmp_path}", "name=h", "data.train_subset=512", "data.test_subset=128", "train.epochs=2",
            "train.batch_size=64", "train.progress=false", "train.tensorboard=off", "model.hidden_sizes=[32]",
            "model.latent_dim=4", "monitor.samples=100"]
    assert main(["train"] + [a for s in sets for a in ("--set", s)]) == 0
    capsys.readouterr()
    assert main(["checkpoints", str(tmp_path / "h"), "--fallback"]) == 0
    out = capsys.readouterr().out
    assert "initial" in out and "epoch" in out and "fallback: step-" in out
    assert main(["checkpoints", str(tmp_path)]) == 2


def test_dry_run_makes_the_checks_of_a_real_run(capsys, tmp_path, mnist):
    base = [f"out_dir={tmp_path}", "name=d"]
    sets = lambda *extra: ["train", "--dry-run"] + [a for s in (*base, *extra) for a in ("--set", s)]  # noqa: E731
    assert main(sets("data.train_subset=70000")) == 2  # checked against the dataset, which a dry run now loads
    assert "data.train_subset (70000) is larger than the train split" in capsys.readouterr().err
    assert main(sets("select.metric=val_loss")) == 2
    assert "data.validation" in capsys.readouterr().err
    assert main(sets("train.device=cuda:0")) == (0 if __import__("torch").cuda.is_available() else 2)
    capsys.readouterr()
    assert main(sets()) == 0
    assert "every check passed; nothing was written" in capsys.readouterr().out
    assert not (tmp_path / "d").exists()


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    from vaekit.cli.common import check_output_path
    from vaekit.errors import StorageError

    (tmp_path / "afile").write_text("x")
    # no model is needed: the -o check comes first
    assert main(["sample", str(tmp_path / "no-model"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a directory" in err and str(tmp_path / "samples.png") in err
    assert main(["reconstruct", str(tmp_path / "no-model"), "-o", str(tmp_path / "afile" / "r.png")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert check_output_path(tmp_path / "new" / "deeper" / "e.json") == tmp_path / "new" / "deeper" / "e.json"
    assert not (tmp_path / "new").exists(), "the check creates nothing"
    with pytest.raises(StorageError, match="is a directory"):
        check_output_path(tmp_path, "-o", "eval.json")


def test_a_database_failure_in_a_command_is_one_line_of_the_given_error():
    from sqlalchemy.exc import OperationalError

    from vaekit.cli.common import db_errors_as
    from vaekit.errors import RegistryError

    @db_errors_as(RegistryError)
    def command(args):
        raise OperationalError("SELECT 1", {}, Exception("connection refused\n  is the server running?"))

    with pytest.raises(RegistryError, match=r"^database error \(OperationalError\): connection refused is the server"):
        command(None)
