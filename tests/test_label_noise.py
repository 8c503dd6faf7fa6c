"""
`--label_noise` in both recipes (`hf_sam.label_noise`, `hf_sam.scripts.label_noise`): the flips (deterministic,
exact count, to another class), only the training data and before the held-out split, `label_noise.json`, the errors
before any model loads, the memorisation callback against a direct computation, and the plot of its curves.
"""

import json

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from transformers import TrainingArguments

from hf_sam import SAMConfig
from hf_sam.label_noise import MemorisationCallback, flip_labels, memorisation_subset
from hf_sam.scripts.label_noise import TRUE_LABEL_COLUMN, add_label_noise
from recipes import run_glue
from recipes import run_image_classification as run_image

from .test_recipes import make_glue_dir
from .test_recipes import parse as parse_glue
from .test_recipes_image import CLASSES, _images, _tiny_flags, make_parquet
from .test_recipes_image import parse as parse_image
from .testing_utils import SequentialSAMTrainer, TinyDataset, save_tiny_text_model, tiny_args, tiny_model


# ---------------------------------------------------------------------------------------------- the flips


def test_flip_labels_is_pinned_deterministic_and_exact():
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    # Pinned: numpy's PCG64 stream is the same on every platform; a change here changes every noisy run.
    noisy, flipped = flip_labels(labels, 3, 0.3, seed=0)
    assert flipped.tolist() == [5, 6, 9] and noisy.tolist() == [0, 1, 2, 0, 1, 0, 1, 1, 2, 1]
    again, flipped_again = flip_labels(labels, 3, 0.3, seed=0)
    assert again.tolist() == noisy.tolist() and flipped_again.tolist() == flipped.tolist()
    assert flip_labels(labels, 3, 0.3, seed=1)[1].tolist() == [3, 4, 7]
    for n, rate, count in ((10, 0.3, 3), (5, 0.5, 2), (7, 0.5, 4), (1000, 0.4, 400), (3, 0.0, 0), (4, 0.99, 4)):
        noisy, flipped = flip_labels(np.arange(n) % 4, 4, rate, seed=2)
        assert len(flipped) == count == round(rate * n) and len(set(flipped.tolist())) == count
        changed = np.flatnonzero(noisy != np.arange(n) % 4)
        assert changed.tolist() == flipped.tolist()  # every flipped label moved to another class, no other did


def test_flipped_labels_are_uniform_over_the_other_classes():
    true = np.zeros(30000, dtype=np.int64)
    noisy, flipped = flip_labels(true, 4, 0.5, seed=0)
    counts = np.bincount(noisy[flipped], minlength=4)
    assert counts[0] == 0 and len(flipped) == 15000
    assert np.abs(counts[1:] / 15000 - 1 / 3).max() < 0.015  # 5000 +- 3.5 sd of a binomial(15000, 1/3)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_rates_are_refused_naming_the_flag(rate, tmp_path):
    with pytest.raises(ValueError, match=rf"`--label_noise` .* in \[0, 1\), got {rate}"):
        flip_labels([0, 1], 2, rate, seed=0)
    with pytest.raises(ValueError, match=r"`--label_noise` .* in \[0, 1\)"):
        parse_image(["--train_file", "x.parquet", "--label_noise", str(rate)] + _tiny_flags(tmp_path))
    with pytest.raises(ValueError, match=r"`--label_noise` .* in \[0, 1\)"):
        parse_glue(["--task_name", "rte", "--label_noise", str(rate), "--output_dir", str(tmp_path)])


def test_add_label_noise_keeps_the_feature_and_the_true_labels():
    features = Features({"text": Value("string"), "label": ClassLabel(names=["a", "b", "c"])})
    data = Dataset.from_dict({"text": list("pqrstuvwxy"), "label": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]}, features=features)
    noisy, record = add_label_noise(data, "label", 3, 0.3, 0)
    assert noisy["label"] == flip_labels(data["label"], 3, 0.3, 0)[0].tolist() and noisy["text"] == data["text"]
    assert noisy[TRUE_LABEL_COLUMN] == data["label"] and noisy.features["label"] == features["label"]
    assert record == {
        "rate": 0.3, "seed": 0, "count": 3, "num_examples": 10, "num_classes": 3,
        "rng": "numpy.random.Generator(PCG64(seed))", "flipped_indices": [5, 6, 9],
    }  # fmt: skip
    # String labels (ids through a map and back): the column keeps its strings.
    strings = Dataset.from_dict({"label": ["x", "y"] * 5})
    to_id, from_id = {"x": 0, "y": 1}.__getitem__, {0: "x", 1: "y"}.__getitem__
    noisy, record = add_label_noise(strings, "label", 2, 0.5, 3, to_id, from_id)
    flipped = set(record["flipped_indices"])
    assert len(flipped) == 5
    assert [v != w for v, w in zip(noisy["label"], strings["label"], strict=True)] == [i in flipped for i in range(10)]
    with pytest.raises(ValueError, match="`--label_noise 0.5` needs at least 2 classes"):
        add_label_noise(strings, "label", 1, 0.5, 3, to_id, from_id)


# ---------------------------------------------------------------------------------------------- the image recipe


class _NoModel:
    @staticmethod
    def from_config(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")


def test_image_recipe_flips_only_the_loaded_training_set_before_the_held_out_split(tmp_path, monkeypatch):
    train = make_parquet(tmp_path / "train.parquet", 20)
    calls = []

    def spy(dataset, *args):
        calls.append(len(dataset))
        return add_label_noise(dataset, *args)

    monkeypatch.setattr(run_image, "add_label_noise", spy)
    argv = ["--train_file", str(train), "--train_val_split", "0.25", "--label_noise", "0.4", "--label_noise_seed", "7"]
    flags = _tiny_flags(tmp_path / "out")
    flags[flags.index("--max_steps") + 1] = "4"
    metrics = run_image.main(*parse_image(argv + ["--do_train", "--do_eval", "--eval_strategy", "steps"] + flags))
    assert calls == [20]  # the whole training file, before 25% of it was held out
    record = json.loads((tmp_path / "out" / "label_noise.json").read_text())
    expected = flip_labels([i % len(CLASSES) for i in range(20)], 3, 0.4, 7)[1].tolist()
    assert record["flipped_indices"] == expected and record["count"] == 8 and record["num_examples"] == 20
    assert (metrics["train_samples"], metrics["eval_samples"]) == (15, 5)
    # The held-out split has noisy labels: its accuracy against the true ones is reported beside them.
    assert {"eval_accuracy", "eval_clean_accuracy", "eval_nll", "eval_ece", "eval_brier"} <= metrics.keys()
    assert {"eval_temperature", "eval_nll_ts", "eval_ece_ts", "eval_brier_ts"} <= metrics.keys()
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "memorisation/flipped_noisy_accuracy" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]  # at each evaluation (eval_steps = logging_steps = 1)

    # With a test file: only the training file is flipped; the test set's labels are its own, so no clean accuracy.
    calls.clear()
    test = make_parquet(tmp_path / "test.parquet", 8, seed=1)
    argv = ["--train_file", str(train), "--validation_file", str(test), "--label_noise", "0.4"]
    metrics = run_image.main(*parse_image(argv + ["--do_train", "--do_eval"] + _tiny_flags(tmp_path / "out2")))
    assert calls == [20] and metrics["eval_samples"] == 8 and "eval_clean_accuracy" not in metrics


def test_image_recipe_refuses_one_class_before_loading_a_model(tmp_path, monkeypatch):
    features = Features({"img": Image(), "label": Value("int64")})
    Dataset.from_dict({"img": _images(6), "label": [3] * 6}, features=features).to_parquet(
        str(tmp_path / "one.parquet")
    )
    monkeypatch.setattr(run_image, "AutoModelForImageClassification", _NoModel)
    argv = ["--train_file", str(tmp_path / "one.parquet"), "--label_noise", "0.2", "--do_train"]
    with pytest.raises(ValueError, match="`--label_noise 0.2` needs at least 2 classes.*has 1"):
        run_image.main(*parse_image(argv + _tiny_flags(tmp_path / "out")))
    assert not (tmp_path / "out" / "label_noise.json").exists()


# ---------------------------------------------------------------------------------------------- the GLUE recipe


def test_glue_recipe_refuses_regression_and_one_class_before_loading_a_model(tmp_path):
    flags = ["--model_name_or_path", str(tmp_path / "no-model"), "--do_train", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="`--label_noise 0.1` flips class labels, but `stsb` is a regression task"):
        parse_glue(["--task_name", "stsb", "--label_noise", "0.1"] + flags)
    floats = tmp_path / "floats.csv"
    floats.write_text("sentence1,label\nhello,0.5\nworld,1.5\n")
    with pytest.raises(ValueError, match="`--label_noise 0.1` flips class labels, but the labels of .* are floats"):
        run_glue.main(*parse_glue(["--train_file", str(floats), "--label_noise", "0.1"] + flags))
    one = tmp_path / "one.csv"
    one.write_text("sentence1,label\nhello,1\nworld,1\n")
    with pytest.raises(ValueError, match="`--label_noise 0.5` needs at least 2 classes.*has 1"):
        run_glue.main(*parse_glue(["--train_file", str(one), "--label_noise", "0.5"] + flags))


def test_image_held_out_accuracies_recomputed_from_the_saved_model(tmp_path):
    """`eval_accuracy` is against the held-out split's noisy labels, `eval_clean_accuracy` against its true ones, each
    equal to a recomputation from the saved model on the same un-augmented images, split as the recipe splits."""
    from datasets import load_dataset
    from transformers import AutoModelForImageClassification

    from hf_sam.scripts.image import build_image_processor, collate_fn, make_transforms

    train = make_parquet(tmp_path / "train.parquet", 40)
    argv = ["--train_file", str(train), "--train_val_split", "0.5", "--label_noise", "0.5", "--label_noise_seed", "1"]
    metrics = run_image.main(*parse_image(argv + ["--do_train", "--do_eval"] + _tiny_flags(tmp_path / "out")))
    raw = load_dataset("parquet", data_files={"train": str(train)})["train"]
    true = np.array(raw["label"])
    noisy, _ = flip_labels(true.tolist(), len(CLASSES), 0.5, 1)
    held_out = raw.add_column("noisy", noisy.tolist()).train_test_split(test_size=0.5, seed=0)["test"]
    _, transform = make_transforms(build_image_processor(16), "img", int, padding=4, flip=True)  # eval: no crop, flip
    pixels = transform({"img": held_out["img"], "__label__": held_out["noisy"]})["pixel_values"]
    batch = collate_fn([{"pixel_values": p, "labels": 0} for p in pixels])
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1).numpy()
    assert metrics["eval_samples"] == 20 and np.array(held_out["noisy"]).tolist() != held_out["label"]
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(predictions == np.array(held_out["noisy"])), abs=1e-12)
    assert metrics["eval_clean_accuracy"] == pytest.approx(np.mean(predictions == np.array(held_out["label"])))


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    return str(save_tiny_text_model(tmp_path_factory.mktemp("tiny-bert")))


def test_glue_held_out_clean_accuracy_is_against_the_true_labels(tmp_path, tiny_text_model):
    """The held-out split is carved from the noisy training data; `eval_clean_accuracy` equals a recomputation."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_sam.scripts.glue import load_glue_tsv, split_off_validation

    data = make_glue_dir(tmp_path / "RTE", "rte", n_train=60)
    argv = [
        "--task_name", "rte", "--data_dir", str(data), "--model_name_or_path", tiny_text_model, "--method", "sam",
        "--validation_split_percentage", "50", "--label_noise", "0.4", "--label_noise_seed", "3",
        "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--max_steps", "2", "--logging_steps", "1",
        "--eval_strategy", "steps", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
        "--disable_tqdm", "true", "--do_train", "--do_eval", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    metrics = run_glue.main(*parse_glue(argv))
    raw = load_glue_tsv("rte", str(data))
    record = json.loads((tmp_path / "out" / "label_noise.json").read_text())
    noisy_labels, flipped = flip_labels(raw["train"]["label"], 2, 0.4, 3)
    assert record["flipped_indices"] == flipped.tolist() and record["count"] == 24
    noisy = raw["train"].add_column("noisy", noisy_labels.tolist())
    held_out = split_off_validation(noisy, 50, seed=0)["validation"][:]  # a dict of lists
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    inputs = tokenizer(held_out["sentence1"], held_out["sentence2"], truncation=True, max_length=32, padding=True)
    with torch.no_grad():
        predictions = model(**inputs.convert_to_tensors("pt")).logits.argmax(-1).numpy()
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(predictions == np.array(held_out["noisy"])), abs=1e-12)
    assert metrics["eval_clean_accuracy"] == pytest.approx(np.mean(predictions == np.array(held_out["label"])))
    assert np.array(held_out["noisy"]).tolist() != held_out["label"]  # the split does hold flipped labels
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert sum("memorisation/clean_accuracy" in entry for entry in history) == 2


# ---------------------------------------------------------------------------------------------- memorisation


def test_memorisation_subset_is_fixed_and_capped():
    true = np.arange(40) % 4
    noisy = true.copy()
    noisy[:10] = (noisy[:10] + 1) % 4
    flipped, clean = memorisation_subset(noisy, true, max_per_group=6, seed=0)
    assert len(flipped) == 6 and set(flipped) <= set(range(10)) and len(clean) == 6 and min(clean) >= 10
    again = memorisation_subset(noisy, true, max_per_group=6, seed=0)
    assert flipped.tolist() == again[0].tolist() and clean.tolist() == again[1].tolist()
    flipped, clean = memorisation_subset(noisy, true, max_per_group=100)
    assert flipped.tolist() == list(range(10)) and clean.tolist() == list(range(10, 40))


def _stack(examples):
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def test_memorisation_callback_logs_what_a_direct_computation_gives(tmp_path):
    dataset = TinyDataset(n=40, seed=0)
    true = dataset.labels.numpy().copy()
    noisy, _ = flip_labels(true, 3, 0.3, seed=0)
    dataset.labels = torch.from_numpy(noisy)  # the model trains on the noisy labels
    model = tiny_model()
    callback = MemorisationCallback(dataset, noisy, true, _stack, max_per_group=8, batch_size=5)
    args = tiny_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3, learning_rate=0.5)
    trainer = SequentialSAMTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, sam_config=SAMConfig(rho=0.05)
    )
    callback.trainer = trainer
    trainer.add_callback(callback)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "memorisation/clean_accuracy" in e]
    assert [e["step"] for e in logged] == [3, 6]
    # Recompute at the end (step 6) by hand: the model's predictions on the callback's examples.
    with torch.no_grad():
        predictions = model(dataset.x)["logits"].argmax(-1).numpy()
    flipped, clean = callback.flipped, callback.clean
    assert len(flipped) == 8 and len(clean) == 8 and (noisy[flipped] != true[flipped]).all()
    assert logged[-1]["memorisation/flipped_noisy_accuracy"] == np.mean(predictions[flipped] == noisy[flipped])
    assert logged[-1]["memorisation/flipped_true_accuracy"] == np.mean(predictions[flipped] == true[flipped])
    assert logged[-1]["memorisation/clean_accuracy"] == np.mean(predictions[clean] == true[clean])
    model.train()
    assert callback.compute(model) == {k: v for k, v in logged[-1].items() if k.startswith("memorisation/")}
    assert model.training  # predicted in eval mode, then put back as it was
    with pytest.raises(ValueError, match="one entry per example, got 40, 39 and 40"):
        MemorisationCallback(dataset, noisy[:-1], true, _stack)
    assert isinstance(args, TrainingArguments)


# ---------------------------------------------------------------------------------------------- the plot


def test_plot_draws_the_memorisation_curves_by_default(tmp_path):
    from hf_sam.plot import load_series, plot_runs

    history = []
    for step, (noisy_acc, clean_acc, memorised) in enumerate([(0.2, 0.3, 0.1), (0.3, 0.45, 0.3), (0.35, 0.4, 0.6)]):
        history.append({"step": step + 1, "loss": 2.0 - step / 2})
        history.append(
            {"step": step + 1, "eval_loss": 2.1, "eval_accuracy": noisy_acc, "eval_clean_accuracy": clean_acc}
        )
        history.append({"step": step + 1, "memorisation/flipped_noisy_accuracy": memorised})
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    series = load_series(run)
    assert list(series) == [
        "loss", "eval_loss", "eval_accuracy", "eval_clean_accuracy", "memorisation/flipped_noisy_accuracy"
    ]  # fmt: skip
    assert series["eval_clean_accuracy"] == ([1, 2, 3], [0.3, 0.45, 0.4], None)
    assert series["memorisation/flipped_noisy_accuracy"][1] == [0.1, 0.3, 0.6]
    out = plot_runs([run], tmp_path / "noise.png")
    assert out.stat().st_size > 0
    # Without eval_clean_accuracy (a run with no label noise), eval_accuracy is not a default panel.
    (run / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "eval_accuracy": 0.5}]}))
    assert load_series(run) == {}
