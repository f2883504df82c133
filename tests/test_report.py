"""The evaluation report end to end on a small model: every part runs or says why it was skipped."""

import json

import pytest
import torch
from PIL import Image

from vaekit.cli.main import main
from vaekit.data import ImageDataset
from vaekit.errors import ConfigError
from vaekit.evaluation.report import EvalConfig, evaluate_model
from vaekit.models import AAE, VAE, AAEConfig, PixelVAE, PixelVAEConfig, VAEConfig


@pytest.fixture(scope="module")
def small(mnist):
    return ImageDataset("mnist", mnist.train.subset(500), mnist.test.subset(200), mnist.classes, mnist.provenance)


def test_report_runs_every_part_and_explains_skips(small, tmp_path):
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden_sizes=(32,)))
    cfg = EvalConfig(metrics=("all",), k=20, nll_examples=50, recon_examples=50, fid_samples=100, batch_size=100,
                     extractor_path=str(tmp_path / "no-extractor"), traversal_dims=3)
    rep = evaluate_model(model, small, tmp_path / "rep", cfg, binarize="dynamic", name="tiny")
    m = rep["metrics"]
    assert m["elbo"]["n"] == 200 and m["nll"]["n"] == 50 and m["nll"]["k"] == 20
    assert m["nll"]["nll"] <= m["elbo"]["neg_elbo"] + 5  # a tighter bound than the 1-sample ELBO (up to noise)
    assert 0 <= m["latent"]["active_units"] <= 4 and m["recon"]["n"] == 50
    assert "vaekit fid-extractor train mnist" in m["fid"]["skipped"]
    assert "dsprites" in m["mig"]["skipped"]
    files = m["images"]["files"]
    assert set(files) == {"samples", "reconstructions", "interpolations", "traversals"}
    assert Image.open(tmp_path / "rep" / files["traversals"]).size[1] == (3 * 30 + 2) * 2  # 3 rows of dims
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["metrics"]["nll"]["nll"] == m["nll"]["nll"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![samples](samples.png)" in md and "Skipped:" in md and "bits/dim" in md and "k = 20" in md
    assert model.training  # the model's mode is restored


def test_report_for_the_pixel_vae(small, tmp_path):
    torch.manual_seed(0)
    model = PixelVAE(PixelVAEConfig(latent_dim=3, conv_channels=(8,), encoder_hidden=(16,), decoder_hidden=(16,),
                                    ar_kernel=5, ar_channels=8, ar_hidden=(8,)))
    cfg = EvalConfig(metrics=("elbo", "nll", "images"), k=10, nll_examples=20, batch_size=100, traversal_dims=2)
    rep = evaluate_model(model, small, tmp_path / "rep", cfg, binarize="dynamic")
    assert rep["metrics"]["nll"]["n"] == 20 and (tmp_path / "rep" / "samples.png").is_file()


def test_eval_config_is_validated():
    with pytest.raises(ConfigError, match="metrics must be"):
        EvalConfig(metrics=("elbo", "inception"))
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        EvalConfig(k=0)
    assert EvalConfig(metrics=("all",)).metrics[0] == "elbo"


def test_cli_evaluate_writes_a_report(tmp_path, capsys, mnist):
    torch.manual_seed(0)
    VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,))).save(tmp_path / "m", metadata={"data": {"binarize": "dynamic"}})
    argv = ["evaluate", str(tmp_path / "m"), "--metrics", "elbo,nll,latent", "-k", "5", "--nll-examples", "30",
            "--examples", "300", "--report-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NLL (k=5)" in out and "active units" in out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["binarize"] == "dynamic" and rep["metrics"]["nll"]["n"] == 30 and rep["metrics"]["elbo"]["n"] == 300
    assert main(["evaluate", str(tmp_path / "m"), "--metrics", "elbo,bogus"]) == 2


def test_nll_and_latent_parts_are_skipped_with_the_reason_for_a_model_declaring_no_elbo(small, tmp_path):
    torch.manual_seed(0)
    model = AAE(AAEConfig(encoder="deterministic", latent_dim=2, hidden_sizes=(8,)))
    assert not model.defines_elbo and not model.gaussian_posterior  # declared, not probed
    rep = evaluate_model(model, small, tmp_path, EvalConfig(metrics=("nll", "latent"), batch_size=100))
    assert "defines no ELBO" in rep["metrics"]["nll"]["skipped"]
    assert "no Gaussian posterior" in rep["metrics"]["latent"]["skipped"]


def test_cli_evaluate_exit_code_and_output_place(tmp_path, capsys, mnist):
    """Non-zero when nothing requested could run (MIG on an MNIST model), with the reason; the report goes
    where -o says, and by default never into the model folder."""
    torch.manual_seed(0)
    model_dir = tmp_path / "m"
    VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,))).save(model_dir, metadata={"data": {"binarize": "dynamic"}})
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(["evaluate", str(model_dir), "--metrics", "mig", "--examples", "50"]) == 1
    err = capsys.readouterr().err
    assert "none of the requested metrics could run" in err and "dsprites" in err
    assert sorted(p.name for p in model_dir.iterdir()) == before  # nothing written into the model folder
    assert (tmp_path / "m-report" / "report.json").is_file()
    # one metric runs, one is skipped: success
    assert main(["evaluate", str(model_dir), "--metrics", "elbo,mig", "--examples", "50"]) == 0
    out = tmp_path / "elsewhere" / "res.json"
    assert main(["evaluate", str(model_dir), "--metrics", "elbo", "--examples", "50", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["elbo"]["n"] == 50 and (out.parent / "res.md").is_file()
    assert main(["evaluate", str(model_dir), "--metrics", "elbo", "-o", str(tmp_path / "x.txt")]) == 2
    assert "-o must name a .json file" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_every_part_carries_its_own_keys(small, tmp_path):
    """The CLI, the Markdown and the benchmarks ask the part: its headline keys exist in its result, each with
    a direction, and it renders and summarises itself."""
    from vaekit.evaluation.parts import PARTS
    from vaekit.evaluation.report import render_markdown, summary_rows

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=3, hidden_sizes=(16,)))
    cfg = EvalConfig(metrics=("elbo", "latent", "nll", "recon", "mig", "images"), k=5, nll_examples=20,
                     batch_size=100, traversal_dims=2)
    rep = evaluate_model(model, small, tmp_path, cfg)
    ran = [n for n, r in rep["metrics"].items() if "skipped" not in r]
    assert ran == ["elbo", "latent", "nll", "recon", "images"] and "mig" not in ran
    md = render_markdown(rep)
    for name in ran:
        part, r = PARTS[name], rep["metrics"][name]
        assert set(part.better.values()) <= {"lower", "higher"}
        assert set(part.headline(r)) == set(part.better)  # every declared headline is in the result
        assert part.summary(r) and f"## {part.title}" in md
    labels = [label for label, _ in summary_rows(rep)]
    assert labels[0] == "mig" and "-ELBO" in labels and "MSE" in labels


def test_cli_evaluate_checks_its_output_path_before_evaluating(tmp_path, capsys, mnist):
    torch.manual_seed(0)
    VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,))).save(tmp_path / "m")
    (tmp_path / "afile").write_text("x")
    for argv, match in (([ "-o", str(tmp_path)], "is a directory"),
                        (["-o", str(tmp_path / "afile" / "r.json")], "not a directory"),
                        (["--metrics", "elbo", "--report-dir", str(tmp_path / "afile")], "not a directory")):
        assert main(["evaluate", str(tmp_path / "m"), *argv]) == 2
        captured = capsys.readouterr()
        assert match in captured.err and "evaluating" not in captured.out  # refused before any work
