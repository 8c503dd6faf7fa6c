"""
recipes/run_image_classification.py and `hf_sam.scripts.image`: a tiny ViT from a config, on tiny parquet and
imagefolder data made in `tmp_path` (always run) and on a few rows of the real CIFAR-10 subset of ../shared/data
(skipped where it is absent); the image processor's geometry against the processor itself; corrupt images.
"""

import json
import logging
import re

import numpy as np
import pytest
import torch

from hf_sam.scripts import image as image_utils
from hf_sam.scripts.utils import make_parser
from recipes import run_image_classification as run_image

from .testing_utils import DATA_DIR, REPO, run_recipe, run_recipe_in_process


CIFAR_DIR = DATA_DIR / "cifar10-small"
requires_cifar = pytest.mark.skipif(
    not (CIFAR_DIR / "train.parquet").is_file(),
    reason=f"CIFAR-10 subset not found at {CIFAR_DIR} (set HF_SAM_DATA_DIR; CI has ../shared/data)",
)
TINY_VIT = "image_size=16,patch_size=8,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32"
CLASSES = ["cat", "dog", "frog"]


def parse(argv: list[str]) -> tuple:
    return make_parser(run_image.ScriptArguments).parse_args_and_config(argv)


# Values of the wrong type (issue 33): `key`, its value, the owner of the field and the type it takes. This recipe
# has no `max_seq_length`; `random_crop_padding` is its own int flag.
WRONGLY_TYPED = [
    ("max_steps", "2.5", "TrainingArguments", "an int"),
    ("gradient_accumulation_steps", "2.0", "TrainingArguments", "an int"),
    ("per_device_train_batch_size", "8.5", "TrainingArguments", "an int"),
    ("max_train_samples", "10.5", "ScriptArguments", "an int or null"),
    ("seed", "1.5", "TrainingArguments", "an int"),
    ("random_crop_padding", "4.5", "ScriptArguments", "an int"),
]


@pytest.mark.parametrize("source", ["yaml", "command line"])
@pytest.mark.parametrize(("key", "value", "owner", "kind"), WRONGLY_TYPED, ids=[row[0] for row in WRONGLY_TYPED])
def test_wrongly_typed_value_is_refused_naming_it_before_anything_loads(
    tmp_path, monkeypatch, capsys, source, key, value, owner, kind
):
    """The recipe's entry point with data and a model that do not exist: the parser's error, naming key, value, type."""
    missing = tmp_path / "missing"
    flags = ["--train_file", str(missing / "train.parquet"), "--model_name_or_path", str(missing / "model")]
    flags += ["--do_train", "--output_dir", str(tmp_path / "out")]
    if source == "yaml":
        config = tmp_path / "recipe.yaml"
        config.write_text(f"{key}: {value}\n")
        message = f"{config}: `{key}` ({owner}.{key}) must be {kind}, got {value} (a float)"
        with pytest.raises(ValueError, match=re.escape(message)):
            run_recipe_in_process("run_image_classification", ["--config", str(config), *flags], monkeypatch)
    else:
        with pytest.raises(SystemExit) as exit_info:
            run_recipe_in_process("run_image_classification", [*flags, f"--{key}", value], monkeypatch)
        assert exit_info.value.code == 2
        assert re.search(rf"argument --{key}(/--[a-z-]+)?: invalid int value: '{value}'", capsys.readouterr().err)
    assert not missing.exists() and not (tmp_path / "out").exists()


def _images(n: int, size: int = 16, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def make_parquet(path, n: int, *, image_column: str = "img", seed: int = 0, size: int = 16):
    """A parquet file with the Hub schema of uoft-cs/cifar10: an `Image` column and a `ClassLabel` column."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({image_column: Image(), "label": ClassLabel(names=CLASSES)})
    data = {image_column: _images(n, size=size, seed=seed), "label": [i % len(CLASSES) for i in range(n)]}
    Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path


def make_imagefolder(root, per_class: int):
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i, image in enumerate(_images(per_class, size=12, seed=len(name))):
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
    """The eval accuracy equals the accuracy of the saved model on the processor's own pixels of the test images."""
    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    train, test = parquet_files
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"train_file: {train}\nvalidation_file: {test}\nmethod: fsam\nrho: 0.2\nlearning_rate: 0.001\n"
        "do_train: true\ndo_eval: true\n"
    )
    out = tmp_path / "out"
    script_args, sam_config, training_args = parse(["--config", str(config), "--rho", "0.1"] + _tiny_flags(out))
    assert (sam_config.method, sam_config.rho, training_args.learning_rate) == ("fsam", 0.1, 0.001)
    metrics = run_image.main(script_args, sam_config, training_args)
    assert json.loads((out / "sam_config.json").read_text())["rho"] == 0.1
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog", "2": "frog"}
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 16, "width": 16}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("sam/sharpness" in log for log in history)

    rows = load_dataset("parquet", data_files=str(test), split="train")
    pixel_values = AutoImageProcessor.from_pretrained(out)(list(rows["img"]), return_tensors="pt")["pixel_values"]
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        predictions = model(pixel_values=torch.as_tensor(np.asarray(pixel_values))).logits.argmax(-1).numpy()
    assert metrics["eval_accuracy"] == pytest.approx(float((predictions == np.asarray(list(rows["label"]))).mean()))
    assert metrics["eval_samples"] == 8 and json.loads((out / "all_results.json").read_text())["eval_samples"] == 8


def test_imagefolder_without_validation_split(tmp_path):
    train_dir = make_imagefolder(tmp_path / "images", per_class=6)
    argv = ["--train_dir", str(train_dir), "--train_val_split", "0.25", "--method", "sam", "--do_train", "--do_eval"]
    metrics = run_image.main(*parse(argv + _tiny_flags(tmp_path / "out")))
    assert (metrics["train_samples"], metrics["eval_samples"]) == (13, 5)  # 18 images, 25% held out
    assert json.loads((tmp_path / "out" / "sam_config.json").read_text())["method"] == "sam"


def test_string_labels_and_other_column_names(tmp_path):
    from datasets import Dataset, Features, Image, Value

    features = Features({"image": Image(), "labels": Value("string")})
    data = {"image": _images(12), "labels": ["dog", "cat", "frog"] * 4}
    Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "train.parquet"))
    argv = ["--train_file", str(tmp_path / "train.parquet"), "--do_train", "--do_eval"]
    metrics = run_image.main(*parse(argv + _tiny_flags(tmp_path / "out")))
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
    metrics = run_image.main(*parse(argv + flags))
    assert "eval_accuracy" in metrics
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["image_size"] == 32 and config["id2label"]["0"] == "airplane"
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "sam_config.json").is_file()


def test_shipped_yaml_recipe_parses():
    script_args, sam_config, training_args = parse(
        ["--config", str(REPO / "recipes" / "configs" / "cifar10_vit_sam.yaml"), "--output_dir", "unused"]
    )
    assert script_args.model_type == "vit" and script_args.train_file.endswith("train.parquet")
    assert sam_config.method == "sam" and training_args.do_train


def test_bad_inputs_fail_clearly(tmp_path, parquet_files):
    train, test = parquet_files
    flags = _tiny_flags(tmp_path / "out") + ["--do_train"]
    with pytest.raises(ValueError, match="no image column 'picture'.*'img'"):
        run_image.main(*parse(["--train_file", str(train), "--image_column_name", "picture"] + flags))
    other = make_parquet(tmp_path / "other.parquet", 4, image_column="pixels")
    with pytest.raises(ValueError, match="no image column.*image_column_name"):
        run_image.main(*parse(["--train_file", str(other)] + flags))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        run_image.main(*parse(["--train_file", str(tmp_path / "missing.parquet")] + flags))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_image.main(*parse(["--train_dir", str(tmp_path / "nowhere")] + flags))
    with pytest.raises((ConnectionError, FileNotFoundError), match="nobody/no-such-dataset"):  # offline in tests
        run_image.main(*parse(["--dataset_name", "nobody/no-such-dataset"] + flags))
    with pytest.raises(ValueError, match="exactly one data source"):
        parse(["--train_file", str(train), "--train_dir", str(tmp_path)] + flags)
    with pytest.raises(ValueError, match="exactly one of `model_name_or_path`"):
        parse(["--train_file", str(train), "--model_name_or_path", "x"] + flags)
    for flag in ("--max_train_samples", "--max_eval_samples"):
        with pytest.raises(ValueError, match=f"`{flag}` must be positive, got -5"):
            parse(["--train_file", str(train), flag, "-5"] + flags)
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        parse(["--train_file", str(train), "--deepspeed", "ds_config.json"] + flags)


def test_corrupt_images_are_reported_or_skipped(tmp_path, parquet_files, caplog):
    """A file that does not decode stops the run before the model is loaded, naming it; or is dropped and counted."""
    from datasets import Dataset, Features, Image, Value

    train_dir = make_imagefolder(tmp_path / "images", per_class=4)
    (train_dir / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    truncated = (train_dir / "cat" / "1.png").read_bytes()
    (train_dir / "cat" / "1.png").write_bytes(truncated[: len(truncated) // 2])
    flags = [
        "--train_dir",
        str(train_dir),
        "--validation_dir",
        str(make_imagefolder(tmp_path / "val", 1)),
        "--do_train",
    ]
    no_model = ["--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "x")]
    with pytest.raises(ValueError, match=r"2 of the 12 train images do not decode: row \d+ \(.*/(cat/1|dog/2)\.png\)"):
        run_image.main(*parse(flags + no_model))
    with pytest.raises(ValueError, match="or pass `--skip_corrupt_images`"):
        run_image.main(*parse(flags + no_model))
    with caplog.at_level(logging.WARNING, logger="hf_sam.scripts.image"):
        metrics = run_image.main(*parse(flags + ["--skip_corrupt_images"] + _tiny_flags(tmp_path / "out")))
    assert metrics["train_samples"] == 10 and "Skipping 2 of the 12 train images" in caplog.text

    # A parquet row whose bytes are not an image is named by its row.
    rows = [{"bytes": b"garbage", "path": None}] + [{"bytes": _png(image), "path": None} for image in _images(3)]
    features = Features({"img": Image(), "label": Value("int64")})
    Dataset.from_dict({"img": rows, "label": [0, 1, 0, 1]}, features=features).to_parquet(
        str(tmp_path / "bad.parquet")
    )
    argv = ["--train_file", str(tmp_path / "bad.parquet"), "--validation_file", str(parquet_files[1]), "--do_train"]
    with pytest.raises(ValueError, match=r"1 of the 4 train images do not decode: row 0 \(row 0\): Unidentified"):
        run_image.main(*parse(argv + no_model))
    assert image_utils.find_undecodable_images(Dataset.from_dict({"img": _images(2)}), "img") == []


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "processor_name", ["CLIPImageProcessorPil", "ConvNextImageProcessorPil", "ViTImageProcessorPil"]
)
def test_transform_follows_the_processor_geometry(processor_name):
    """Resize the shortest edge then centre-crop (CLIP, ConvNeXt's crop_pct) or resize to height x width (ViT): the
    eval transform's pixels equal the processor's own output, up to the resampling filters' rounding."""
    import transformers
    from PIL import Image

    sizes = {
        "CLIPImageProcessorPil": dict(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}),
        "ConvNextImageProcessorPil": dict(size={"shortest_edge": 20}),  # crop_pct 0.875: resize to 22, crop 20
        "ViTImageProcessorPil": dict(size={"height": 16, "width": 12}),
    }
    processor = getattr(transformers, processor_name)(**sizes[processor_name])
    height, width = 24, 36  # not square, so the resize and the crop both matter
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (height + width - 2)], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    _, eval_transform = image_utils.make_transforms(processor, "img", int, padding=0, flip=False)
    ours = eval_transform({"img": [image], "__label__": [0]})["pixel_values"][0]
    reference = torch.as_tensor(np.asarray(processor(image, return_tensors="pt")["pixel_values"][0]))
    expected_size = {"CLIPImageProcessorPil": (16, 16), "ConvNextImageProcessorPil": (20, 20)}.get(
        processor_name, (16, 12)
    )
    assert tuple(ours.shape) == tuple(reference.shape) == (3, *expected_size)
    assert image_utils.processor_geometry(processor).output_size == expected_size
    # A crop one pixel off differs by 0.03-0.09 on average on this gradient; resampling rounding by under 0.004.
    assert (ours - reference).abs().mean() < 0.01 and (ours - reference).abs().max() < 0.03


def test_recipe_with_a_shortest_edge_and_crop_size_processor(tmp_path, parquet_files):
    """A processor that resizes the shortest edge to 20 and crops 16 feeds a 16-pixel ViT (a 20 x 20 square would not)."""
    from transformers import CLIPImageProcessorPil

    processor_dir = tmp_path / "processor"
    CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}).save_pretrained(
        processor_dir
    )
    train, test = parquet_files
    argv = ["--train_file", str(train), "--validation_file", str(test), "--image_processor_name", str(processor_dir)]
    metrics = run_image.main(*parse(argv + ["--do_train", "--do_eval"] + _tiny_flags(tmp_path / "out")))
    assert metrics["eval_samples"] == 8
    saved = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert saved["crop_size"] == {"height": 16, "width": 16} and saved["size"] == {"shortest_edge": 20}


def test_augmentation_keeps_shape_and_eval_is_deterministic():
    processor = image_utils.build_image_processor(16)
    train_transform, eval_transform = image_utils.make_transforms(processor, "img", int, padding=4, flip=True)
    batch = {"img": _images(2, size=12), "__label__": [0, 2]}
    torch.manual_seed(0)
    train = train_transform(batch)
    assert [tuple(x.shape) for x in train["pixel_values"]] == [(3, 16, 16)] * 2 and train["labels"] == [0, 2]
    first, second = eval_transform(batch), eval_transform(batch)
    assert torch.equal(first["pixel_values"][0], second["pixel_values"][0])
    crops = {
        tuple(image_utils.random_crop_with_padding(torch.ones(1, 4, 4), 2).sum(dim=(1, 2)).tolist()) for _ in range(50)
    }
    assert len(crops) > 1  # different windows keep different numbers of (non-padding) pixels


def test_two_processes(tmp_path, parquet_files):
    train, test = parquet_files
    out = tmp_path / "out"
    argv = ["--train_file", str(train), "--validation_file", str(test), "--method", "fsam", "--do_train", "--do_eval"]
    run_recipe(tmp_path, "run_image_classification", argv + _tiny_flags(out), processes=2)
    assert json.loads((out / "sam_config.json").read_text())["method"] == "fsam"
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_accuracy" in results
    assert results["epoch"] == 1.0  # 16 examples, 4 per process and step: 2 steps per epoch with 2 processes


def test_sharpness_on_training_data_is_taken_without_augmentation_on_a_fixed_shuffled_subset(tmp_path, parquet_files):
    """
    `--sharpness_data train`: the value logged at the end of training equals `ascent_sharpness` of the saved model on
    the processor's own (un-augmented) pixels of the first 6 training rows after a seed-0 shuffle.
    """
    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_sam.sharpness import ascent_sharpness

    train, test = parquet_files
    out = tmp_path / "out"
    argv = ["--train_file", str(train), "--validation_file", str(test), "--do_train", "--seed", "3"]
    argv += ["--sharpness_every_n_steps", "1", "--sharpness_data", "train", "--sharpness_num_batches", "1"]
    argv += ["--sharpness_batch_size", "6", "--sharpness_diagnostics", "ascent"]
    run_image.main(*parse(argv + _tiny_flags(out)))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    measured = {log["step"]: log["sharpness/ascent"] for log in history if "sharpness/ascent" in log}
    assert sorted(measured) == [0, 1, 2]

    rows = load_dataset("parquet", data_files=str(train), split="train").shuffle(seed=0).select(range(6))
    pixel_values = AutoImageProcessor.from_pretrained(out)(list(rows["img"]), return_tensors="pt")["pixel_values"]
    batch = {"pixel_values": torch.as_tensor(np.asarray(pixel_values)), "labels": torch.tensor(rows["label"])}
    model = AutoModelForImageClassification.from_pretrained(out)
    assert measured[2] == pytest.approx(ascent_sharpness(model, [batch]).value, rel=1e-5)
    with pytest.raises(ValueError, match="17 examples, but the train data has 16"):
        run_image.main(
            *parse(
                argv[:-6]
                + ["--sharpness_num_batches", "17", "--sharpness_batch_size", "1"]
                + _tiny_flags(tmp_path / "bad")
            )
        )
