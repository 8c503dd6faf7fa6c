"""SAMConfig: validation, argument parsing, and sharing as `sam_config.json`."""

import json
import logging

import pytest
from transformers import HfArgumentParser, TrainingArguments

import hf_sam
from hf_sam import SAMConfig, SAMTrainer

from .testing_utils import TinyDataset, tiny_args, tiny_model


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"method": "nosuchsam"}, "method", "['sam', 'fsam', 'vasso', 'gsam', 'aesam', 'looksam']"),
        ({"rho": -0.1}, "rho", ">= 0"),
        ({"rho": float("nan")}, "rho", ">= 0"),
        ({"rho": "0.05"}, "rho", ">= 0"),
        ({"adaptive_eta": -1e-3}, "adaptive_eta", ">= 0"),
        ({"fsam_sigma": -1.0}, "fsam_sigma", ">= 0"),
        ({"fsam_lambda": 1.0}, "fsam_lambda", "[0, 1)"),
        ({"fsam_lambda": -0.1}, "fsam_lambda", "[0, 1)"),
        ({"vasso_theta": 1.5}, "vasso_theta", "[0, 1]"),
        ({"vasso_theta": float("inf")}, "vasso_theta", "[0, 1]"),
        ({"gsam_alpha": -0.1}, "gsam_alpha", ">= 0"),
        ({"rho_min": -0.1}, "rho_min", ">= 0"),
        ({"method": "gsam", "rho": 0.1, "rho_min": 0.2}, "rho_min", "<= `rho` (0.1)"),
        ({"method": "gsam", "perturbation_sync": "local"}, "perturbation_sync", "'global'"),
        ({"aesam_delta": 1.0}, "aesam_delta", "[0, 1)"),
        ({"aesam_lambda1": float("nan")}, "aesam_lambda1", "a finite number"),
        ({"aesam_lambda2": "1"}, "aesam_lambda2", "a finite number"),
        ({"method": "aesam", "interval": 2}, "interval", "must be 1 with `method='aesam'`"),
        ({"method": "aesam", "perturbation_sync": "local"}, "perturbation_sync", "'global'"),
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
        parser.parse_args_into_dataclasses(["--method", "nosuchsam", "--output_dir", str(tmp_path)])


def test_save_and_load_round_trip(tmp_path):
    config = SAMConfig(method="fsam", rho=0.2, adaptive=True, fsam_sigma=0.5)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "sam_config.json").read_text())["fsam_sigma"] == 0.5
    assert SAMConfig.from_pretrained(tmp_path) == config


def test_saved_config_records_the_hf_sam_version(tmp_path):
    SAMConfig().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "sam_config.json").read_text())["hf_sam_version"] == hf_sam.__version__


def test_load_warns_and_drops_unknown_keys_of_a_newer_version(tmp_path, caplog):
    """Like PEFT: a config written by a newer hf_sam with one more field still loads, with a warning naming it."""
    values = {"method": "fsam", "rho": 0.05, "future_field": 1, "hf_sam_version": "9.0.0"}
    (tmp_path / "sam_config.json").write_text(json.dumps(values))
    with caplog.at_level(logging.WARNING):
        config = SAMConfig.from_pretrained(tmp_path)
    assert config == SAMConfig(method="fsam", rho=0.05)
    assert "future_field" in caplog.text and "9.0.0" in caplog.text


def test_load_rejects_bad_values_naming_the_file(tmp_path):
    (tmp_path / "sam_config.json").write_text(json.dumps({"rho": -1}))
    with pytest.raises(ValueError, match=r"sam_config\.json: `rho`"):
        SAMConfig.from_pretrained(tmp_path)


def test_load_corrupt_json_names_the_file(tmp_path):
    (tmp_path / "sam_config.json").write_text('{"rho": 0.05,')
    with pytest.raises(ValueError, match=r"sam_config\.json is not valid JSON"):
        SAMConfig.from_pretrained(tmp_path)


def test_load_missing_directory_or_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        SAMConfig.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="No sam_config.json found in the directory"):
        SAMConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("rho", float("nan"), "`rho`"), ("method", "foo", "`method`"), ("interval", 0, "`interval`")],
)
def test_config_changed_after_construction_is_refused_when_training_starts(tmp_path, field, value, message):
    config = SAMConfig()
    trainer = SAMTrainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=TinyDataset(), sam_config=config)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0


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
