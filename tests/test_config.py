import pytest

from vaekit.config import parse_override
from vaekit.errors import ConfigError
from vaekit.models.vae import VAEConfig
from vaekit.training.config import TrainConfig, load_run_config, run_config_from_dict


def test_override_values_are_typed():
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("train.progress=false") == ("train.progress", False)
    assert parse_override("model.hidden_sizes=[200, 200]") == ("model.hidden_sizes", [200, 200])
    assert parse_override("name=my run") == ("name", "my run")


def test_overrides_reach_the_config():
    cfg = load_run_config(None, ["train.lr=3e-4", "model.hidden_sizes=[200,100]", "data.binarize=dynamic"])
    assert cfg.train.lr == 3e-4
    assert cfg.model.hidden_sizes == (200, 100)
    assert cfg.data.binarize == "dynamic"


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as exc:
        load_run_config(None, ["train.lrr=1"])
    msg = str(exc.value)
    assert "train.lrr" in msg and "train.lr" in msg and "model.latent_dim" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="valid keys"):
        run_config_from_dict({"trian": {}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.latent_dim=abc", "model.latent_dim must be an integer"),
        ("model.latent_dim=0", "model.latent_dim must be > 0"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("data.binarize=sometimes", "data.binarize must be one of"),
        ("data.dataset=cifar", "data.dataset must be one of"),
        ("model.family=nope", "model family must be one of"),
        ("train.progress=3", "train.progress must be true or false"),
        ("badformat", "key=value"),
    ],
)
def test_bad_values_raise_clear_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_run_config(None, [override])


def test_config_file_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel:\n  latent_dim: 8\ntrain:\n  epochs: 2\n")
    cfg = load_run_config(path, ["train.epochs=3"])
    assert cfg.model.latent_dim == 8 and cfg.train.epochs == 3 and cfg.name == "x"
    again = run_config_from_dict(cfg.to_dict())
    assert again == cfg


def test_dataclass_validation_on_creation():
    with pytest.raises(ConfigError):
        VAEConfig(architecture="transformer")
    with pytest.raises(ConfigError):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="divisible"):
        from vaekit.models import VAE

        VAE(VAEConfig(architecture="conv", conv_channels=(8, 8, 8)))


@pytest.mark.parametrize(
    "yaml_text, fragments",
    [
        ("data:\n  binarize: no\n", ["data.binarize must be one of", "you wrote no (c.yaml line 2)", "boolean False"]),
        ("train:\n  epochs: 010\n", ["train.epochs must be an integer", "you wrote 010 (c.yaml line 2)", "octal"]),
        ("model:\n  hidden_sizes: [400, 0200]\n", ["model.hidden_sizes[1]", "you wrote 0200 (c.yaml line 2)"]),
        ("monitor:\n  on_collapse: off\n", ["monitor.on_collapse", "you wrote off (c.yaml line 2)"]),
    ],
)
def test_yaml_type_surprises_are_reported_with_the_text_written(tmp_path, yaml_text, fragments):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_run_config(path)
    for fragment in fragments:
        assert fragment in str(exc.value), str(exc.value)


def test_yaml_numbers_read_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: 2024-01-01\ntrain:\n  lr: 3e-4\n  progress: yes\n")  # PyYAML: a date, text, True
    cfg = load_run_config(path)
    assert cfg.name == "2024-01-01" and cfg.train.lr == 3e-4 and cfg.train.progress is True
    with pytest.raises(ConfigError, match=r"you wrote 010 \(--set 'model.latent_dim=010'\)"):
        load_run_config(None, ["model.latent_dim=010"])  # PyYAML: silently 8


def test_a_subset_larger_than_its_split_is_an_error(mnist_small):
    from vaekit.training.config import DataConfig

    with pytest.raises(ConfigError, match=r"data.train_subset \(5000\) is larger than the train split"):
        DataConfig(train_subset=5000).check_sizes(mnist_small)
    with pytest.raises(ConfigError, match=r"data.test_subset \(501\) is larger than the test split .*500"):
        DataConfig(test_subset=501).check_sizes(mnist_small)
    DataConfig(train_subset=2000, test_subset=500).check_sizes(mnist_small)
