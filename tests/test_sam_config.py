"""SAMConfig: validation, argument parsing, and sharing as `sam_config.json`."""

import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_sam import SAMConfig, SAMTrainer

from .testing_utils import TinyDataset, tiny_args, tiny_model


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"method": "gsam"}, "method", "['sam', 'fsam', 'looksam']"),
        ({"rho": -0.1}, "rho", ">= 0"),
        ({"rho": float("nan")}, "rho", ">= 0"),
        ({"rho": "0.05"}, "rho", ">= 0"),
        ({"adaptive_eta": -1e-3}, "adaptive_eta", ">= 0"),
        ({"fsam_sigma": -1.0}, "fsam_sigma", ">= 0"),
        ({"fsam_lambda": 1.0}, "fsam_lambda", "[0, 1)"),
        ({"fsam_lambda": -0.1}, "fsam_lambda", "[0, 1)"),
        ({"perturbation_sync": "sometimes"}, "perturbation_sync", "['global', 'local']"),
        ({"adaptive": "yes"}, "adaptive", "True or False"),
        ({"normalize": 1}, "normalize", "True or False"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError) as error:
        SAMConfig(**kwargs)
    assert f"`{field}`" in str(error.value)
    assert allowed in str(error.value)


def test_bad_config_fails_before_training(tmp_path):
    with pytest.raises(TypeError, match="sam_config"):
        SAMTrainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=TinyDataset(), sam_config={"rho": 1})


def test_parsed_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((SAMConfig, TrainingArguments))
    sam_config, training_args = parser.parse_args_into_dataclasses(
        [
            "--method", "fsam", "--rho", "0.1", "--adaptive", "--normalize", "false", "--fsam_lambda", "0.5",
            "--perturbation_sync", "local", "--output_dir", str(tmp_path), "--learning_rate", "1e-3",
        ]
    )  # fmt: skip
    assert sam_config == SAMConfig(
        method="fsam", rho=0.1, adaptive=True, normalize=False, fsam_lambda=0.5, perturbation_sync="local"
    )
    assert training_args.learning_rate == 1e-3
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--method", "gsam", "--output_dir", str(tmp_path)])


def test_save_and_load_round_trip(tmp_path):
    config = SAMConfig(method="fsam", rho=0.2, adaptive=True, fsam_sigma=0.5)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "sam_config.json").read_text())["fsam_sigma"] == 0.5
    assert SAMConfig.from_pretrained(tmp_path) == config


def test_load_rejects_unknown_keys_and_bad_values(tmp_path):
    (tmp_path / "sam_config.json").write_text(json.dumps({"method": "sam", "rho": 0.05, "lr": 1}))
    with pytest.raises(ValueError, match="lr"):
        SAMConfig.from_pretrained(tmp_path)
    (tmp_path / "sam_config.json").write_text(json.dumps({"rho": -1}))
    with pytest.raises(ValueError, match="`rho`"):
        SAMConfig.from_pretrained(tmp_path)


def test_load_missing_repo_fails_clearly(tmp_path):
    with pytest.raises(OSError):
        SAMConfig.from_pretrained(tmp_path / "nowhere")


def test_trainer_writes_config_into_output_dir_and_checkpoints(tmp_path):
    config = SAMConfig(method="fsam", rho=0.07)
    trainer = SAMTrainer(
        model=tiny_model(),
        args=tiny_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=4),
        train_dataset=TinyDataset(),
        sam_config=config,
    )
    trainer.train()
    trainer.save_model()
    for directory in (tmp_path, tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"):
        assert SAMConfig.from_pretrained(directory) == config
    assert (tmp_path / "checkpoint-2" / "sam_state.pt").is_file()
