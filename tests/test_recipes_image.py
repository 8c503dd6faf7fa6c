"""
Smoke tests of recipes/run_image_classification.py: a tiny ViT from a config, on tiny parquet and imagefolder data made
in `tmp_path` (always run) and on a few rows of the real CIFAR-10 subset of ../shared/data (skipped where it is absent).
"""

import json

import numpy as np
import pytest
import torch

from .test_recipes import DATA_DIR, REPO, load_recipe, run_two_processes


run_image = load_recipe("run_image_classification")

CIFAR_DIR = DATA_DIR / "cifar10-small"
requires_cifar = pytest.mark.skipif(
    not (CIFAR_DIR / "train.parquet").is_file(),
    reason=f"CIFAR-10 subset not found at {CIFAR_DIR} (set HF_SAM_DATA_DIR; CI has ../shared/data)",
)
TINY_VIT = "image_size=16,patch_size=8,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32"
CLASSES = ["cat", "dog", "frog"]


def _images(n: int, size: int = 12, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def make_parquet(path, n: int, *, image_column: str = "img", seed: int = 0):
    """A parquet file with the Hub schema of uoft-cs/cifar10: an `Image` column and a `ClassLabel` column."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({image_column: Image(), "label": ClassLabel(names=CLASSES)})
    data = {image_column: _images(n, seed=seed), "label": [i % len(CLASSES) for i in range(n)]}
    Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path


def make_imagefolder(root, per_class: int):
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i, image in enumerate(_images(per_class, seed=len(name))):
            image.save(root / name / f"{i}.png")
    return root


def _tiny_flags(output_dir):
    return [
        "--model_type", "vit", "--config_overrides", TINY_VIT, "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--logging_steps", "1", "--report_to", "none", "--use_cpu",
        "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    return make_parquet(root / "train.parquet", 16), make_parquet(root / "test.parquet", 8, seed=1)


def test_parquet_with_yaml_config_and_cli_override(tmp_path, parquet_files):
    train, test = parquet_files
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"train_file: {train}\nvalidation_file: {test}\nmethod: fsam\nrho: 0.2\nlearning_rate: 0.001\n"
        "do_train: true\ndo_eval: true\n"
    )
    out = tmp_path / "out"
    script_args, sam_config, training_args = run_image.parse_args(
        ["--config", str(config), "--rho", "0.1"] + _tiny_flags(out)
    )
    assert (sam_config.method, sam_config.rho, training_args.learning_rate) == ("fsam", 0.1, 0.001)
    metrics = run_image.main(script_args, sam_config, training_args)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert json.loads((out / "sam_config.json").read_text())["rho"] == 0.1
    assert "eval_accuracy" in json.loads((out / "all_results.json").read_text())
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog", "2": "frog"}
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 16, "width": 16}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("sam/sharpness" in log for log in history)


def test_imagefolder_without_validation_split(tmp_path):
    train_dir = make_imagefolder(tmp_path / "images", per_class=6)
    argv = ["--train_dir", str(train_dir), "--train_val_split", "0.25", "--method", "sam", "--do_train", "--do_eval"]
    metrics = run_image.main(*run_image.parse_args(argv + _tiny_flags(tmp_path / "out")))
    assert "eval_accuracy" in metrics and metrics["epoch"] > 0
    assert json.loads((tmp_path / "out" / "sam_config.json").read_text())["method"] == "sam"


def test_string_labels_and_other_column_names(tmp_path):
    from datasets import Dataset, Features, Image, Value

    features = Features({"image": Image(), "labels": Value("string")})
    data = {"image": _images(12), "labels": ["dog", "cat", "frog"] * 4}
    Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "train.parquet"))
    argv = ["--train_file", str(tmp_path / "train.parquet"), "--do_train", "--do_eval"]
    metrics = run_image.main(*run_image.parse_args(argv + _tiny_flags(tmp_path / "out")))
    assert "eval_accuracy" in metrics
    assert json.loads((tmp_path / "out" / "config.json").read_text())["label2id"] == {"cat": 0, "dog": 1, "frog": 2}


@requires_cifar
def test_real_cifar_subset(tmp_path):
    argv = [
        "--train_file", str(CIFAR_DIR / "train.parquet"), "--validation_file", str(CIFAR_DIR / "test.parquet"),
        "--max_train_samples", "16", "--max_eval_samples", "16", "--method", "fsam", "--do_train", "--do_eval",
    ]  # fmt: skip
    flags = _tiny_flags(tmp_path)
    flags[flags.index(TINY_VIT)] = TINY_VIT.replace("image_size=16", "image_size=32")
    metrics = run_image.main(*run_image.parse_args(argv + flags))
    assert "eval_accuracy" in metrics
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["image_size"] == 32 and config["id2label"]["0"] == "airplane"
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "sam_config.json").is_file()


def test_shipped_yaml_recipe_parses():
    script_args, sam_config, training_args = run_image.parse_args(
        ["--config", str(REPO / "recipes" / "configs" / "cifar10_vit_sam.yaml"), "--output_dir", "unused"]
    )
    assert script_args.model_type == "vit" and script_args.train_file.endswith("train.parquet")
    assert sam_config.method == "sam" and training_args.do_train


def test_bad_inputs_fail_clearly(tmp_path, parquet_files):
    train, test = parquet_files
    flags = _tiny_flags(tmp_path / "out") + ["--do_train"]
    with pytest.raises(ValueError, match="no image column 'picture'.*'img'"):
        run_image.main(*run_image.parse_args(["--train_file", str(train), "--image_column_name", "picture"] + flags))
    other = make_parquet(tmp_path / "other.parquet", 4, image_column="pixels")
    with pytest.raises(ValueError, match="no image column.*image_column_name"):
        run_image.main(*run_image.parse_args(["--train_file", str(other)] + flags))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        run_image.main(*run_image.parse_args(["--train_file", str(tmp_path / "missing.parquet")] + flags))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_image.main(*run_image.parse_args(["--train_dir", str(tmp_path / "nowhere")] + flags))
    with pytest.raises((ConnectionError, FileNotFoundError), match="nobody/no-such-dataset"):  # offline in tests
        run_image.main(*run_image.parse_args(["--dataset_name", "nobody/no-such-dataset"] + flags))
    with pytest.raises(ValueError, match="exactly one data source"):
        run_image.parse_args(["--train_file", str(train), "--train_dir", str(tmp_path)] + flags)
    with pytest.raises(ValueError, match="exactly one of `model_name_or_path`"):
        run_image.parse_args(["--train_file", str(train), "--model_name_or_path", "x"] + flags)


def test_augmentation_keeps_shape_and_eval_is_deterministic():
    processor = run_image.build_image_processor(16)
    train_transform, eval_transform = run_image.make_transforms(processor, "img", int, padding=4, flip=True)
    batch = {"img": _images(2), "__label__": [0, 2]}
    torch.manual_seed(0)
    train = train_transform(batch)
    assert [tuple(x.shape) for x in train["pixel_values"]] == [(3, 16, 16)] * 2 and train["labels"] == [0, 2]
    first, second = eval_transform(batch), eval_transform(batch)
    assert torch.equal(first["pixel_values"][0], second["pixel_values"][0])
    crops = {
        tuple(run_image.random_crop_with_padding(torch.ones(1, 4, 4), 2).sum(dim=(1, 2)).tolist()) for _ in range(50)
    }
    assert len(crops) > 1  # different windows keep different numbers of (non-padding) pixels


def test_two_processes(tmp_path, parquet_files):
    train, test = parquet_files
    out = tmp_path / "out"
    argv = ["--train_file", str(train), "--validation_file", str(test), "--method", "fsam", "--do_train", "--do_eval"]
    run_two_processes(tmp_path, "run_image_classification", argv + _tiny_flags(out))
    assert json.loads((out / "sam_config.json").read_text())["method"] == "fsam"
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_accuracy" in results
    assert results["epoch"] == 1.0  # 16 examples, 4 per process and step: 2 steps per epoch with 2 processes
