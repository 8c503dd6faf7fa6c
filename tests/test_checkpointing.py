"""Checkpoints: complete or not, resumed only with compatible SAM settings, unreadable state files named."""

import datetime
import logging
import shutil

import pytest
import torch
from transformers import Trainer

from hf_sam import SAMConfig, SAMTrainer
from hf_sam.checkpointing import checkpoint_problems, last_complete_checkpoint, read_checkpoint_manifest

from .testing_utils import TinyTextDataset, params_of, text_args, tiny_bert


def _trainer(output_dir, sam_config, seed=0):
    """6 steps of a tiny BERT, a checkpoint every 2."""
    return SAMTrainer(
        model=tiny_bert(seed=seed),
        args=text_args(output_dir, max_steps=6, save_strategy="steps", save_steps=2),
        train_dataset=TinyTextDataset(),
        sam_config=sam_config,
    )


@pytest.fixture(scope="module")
def fsam_run(tmp_path_factory):
    """An uninterrupted F-SAM run with checkpoints 2, 4, 6 and its final weights."""
    output_dir = tmp_path_factory.mktemp("fsam")
    trainer = _trainer(output_dir, SAMConfig(method="fsam", rho=0.1))
    trainer.train()
    return output_dir, params_of(trainer.model)


def test_complete_checkpoint_has_no_problems(fsam_run):
    output_dir, _ = fsam_run
    assert checkpoint_problems(output_dir / "checkpoint-4") == []
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-6")


@pytest.mark.parametrize(
    ("removed", "problem"),
    [
        ("trainer_state.json", "trainer_state.json"),
        ("sam_state.pt", "sam_state.pt"),
        ("optimizer.pt", "optimizer"),
        ("model.safetensors", "model weights"),
    ],
)
def test_a_save_cut_short_is_skipped_with_a_warning(fsam_run, tmp_path, caplog, removed, problem):
    output_dir, _ = fsam_run
    copy = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(output_dir / name, copy / name)
    (copy / "checkpoint-4" / removed).unlink()
    assert any(problem in p for p in checkpoint_problems(copy / "checkpoint-4"))
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(copy) == str(copy / "checkpoint-2")
    assert "checkpoint-4" in caplog.text and problem in caplog.text


def test_the_manifest_lists_every_file_at_its_size(fsam_run):
    output_dir, _ = fsam_run
    checkpoint = output_dir / "checkpoint-4"
    manifest = read_checkpoint_manifest(checkpoint)
    assert manifest["world_size"] == 1 and manifest["global_step"] == 4
    names = {p.name for p in checkpoint.iterdir()} - {"hf_sam_manifest.json", "run_cost.json"}
    assert set(manifest["files"]) == names and "sam_state.pt" in names and "rng_state.pth" in names
    assert all(manifest["files"][name] == (checkpoint / name).stat().st_size for name in names)
    assert not (checkpoint / "hf_sam_saving").exists() and not any(checkpoint.glob("*.tmp*"))


def test_save_total_limit_rotates_once_the_new_checkpoint_is_complete(tmp_path):
    """Older checkpoints are deleted after the manifest of the new one is written, never before."""
    trainer = SAMTrainer(
        model=tiny_bert(),
        args=text_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1),
        train_dataset=TinyTextDataset(),
        sam_config=SAMConfig(method="fsam", rho=0.1),
    )
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    assert trainer.args.save_total_limit == 1 and checkpoint_problems(tmp_path / "checkpoint-6") == []


@pytest.mark.parametrize("case", ["being_written", "cut_short"])
def test_a_checkpoint_being_written_or_cut_short_is_skipped(fsam_run, tmp_path, caplog, case):
    """A checkpoint being written (marker, no manifest yet) or with a file cut short is not complete."""
    output_dir, _ = fsam_run
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(output_dir / name, tmp_path / name)
    if case == "being_written":  # every file there, but process 0 has not seen the others finish
        (tmp_path / "checkpoint-4" / "hf_sam_manifest.json").rename(tmp_path / "checkpoint-4" / "hf_sam_saving")
        problem = "no hf_sam_manifest.json"
    else:
        state = tmp_path / "checkpoint-4" / "sam_state.pt"
        state.write_bytes(state.read_bytes()[:-10])
        problem = "sam_state.pt has"
    assert any(problem in p for p in checkpoint_problems(tmp_path / "checkpoint-4"))
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert problem in caplog.text


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"gradient_accumulation_steps": 2}, "4 examples per optimizer step before, 8 now"),
        ({"per_device_train_batch_size": 2}, "examples are seen twice (about 8 of the epoch"),
        ({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}, "the data order is unchanged"),
    ],
)
def test_resume_with_another_batch_says_once_what_happens_to_the_data_order(
    fsam_run, tmp_path, caplog, changes, expected
):
    output_dir, _ = fsam_run
    trainer = SAMTrainer(
        model=tiny_bert(),
        args=text_args(tmp_path, max_steps=6, **changes),
        train_dataset=TinyTextDataset(),
        sam_config=SAMConfig(method="fsam", rho=0.1),
    )
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))
    notices = [r.getMessage() for r in caplog.records if "examples per optimizer step" in r.getMessage()]
    assert len(notices) == 1 and expected in notices[0], notices
    for key, value in changes.items():
        assert f"`{key}` {4 if key.startswith('per_device') else 1} -> {value}" in notices[0]


def test_a_plain_trainer_checkpoint_is_complete(tmp_path):
    """A checkpoint the plain `Trainer` wrote (no `sam_config.json`) can be resumed by `SAMTrainer`."""
    trainer = Trainer(
        model=tiny_bert(), args=text_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=TinyTextDataset(),
    )  # fmt: skip
    trainer.train()
    assert checkpoint_problems(tmp_path / "checkpoint-2") == []
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_every_process_state_file_must_be_there(fsam_run, tmp_path):
    output_dir, _ = fsam_run
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(output_dir / "checkpoint-2", checkpoint)
    (checkpoint / "hf_sam_manifest.json").unlink()  # written before manifests: the names alone are checked
    (checkpoint / "sam_state.pt").rename(checkpoint / "rank0-of-2-sam_state.pt")
    (checkpoint / "rng_state.pth").rename(checkpoint / "rng_state_0.pth")
    problems = checkpoint_problems(checkpoint)
    assert any("sam_state.pt of process(es) [1] of 2" in p for p in problems)
    assert any("rng_state_{r}.pth) of process(es) [1] of 2" in p for p in problems)
    shutil.copy(checkpoint / "rank0-of-2-sam_state.pt", checkpoint / "rank1-of-2-sam_state.pt")
    shutil.copy(checkpoint / "rng_state_0.pth", checkpoint / "rng_state_1.pth")
    assert checkpoint_problems(checkpoint) == []


def test_an_empty_checkpoint_folder_is_skipped(fsam_run, tmp_path):
    output_dir, _ = fsam_run
    shutil.copytree(output_dir / "checkpoint-2", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4").mkdir()  # interrupted right after the folder was made
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path / "nowhere") is None


def test_resume_true_skips_an_incomplete_checkpoint_and_ends_bitwise_equal(fsam_run, tmp_path, caplog):
    """`train(resume_from_checkpoint=True)` after a save cut short: resumes from the last complete checkpoint."""
    output_dir, final = fsam_run
    copy = tmp_path / "run"
    shutil.copytree(output_dir / "checkpoint-2", copy / "checkpoint-2")
    shutil.copytree(output_dir / "checkpoint-4", copy / "checkpoint-4")
    (copy / "checkpoint-4" / "trainer_state.json").unlink()
    trainer = _trainer(copy, SAMConfig(method="fsam", rho=0.1), seed=1)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert "examples per optimizer step" not in caplog.text  # the same batches: no notice
    for name, p in params_of(trainer.model).items():
        assert torch.equal(p, final[name]), name


def _resume_error(trainer) -> Exception:
    with pytest.raises(Exception) as error:
        trainer.train(resume_from_checkpoint=True)
    return error.value


@pytest.mark.parametrize("output_dir_exists", [True, False])
def test_resume_true_without_any_checkpoint_raises_what_the_trainer_raises(tmp_path, output_dir_exists):
    """
    The same error as `Trainer.train` (type and message, compared with the installed transformers, so a release that
    changes it is caught here), on the same empty (or missing) directory.
    """
    output_dir = tmp_path / "run"
    if output_dir_exists:
        output_dir.mkdir()
    plain = Trainer(model=tiny_bert(), args=text_args(output_dir), train_dataset=TinyTextDataset())
    expected = _resume_error(plain)
    actual = _resume_error(_trainer(output_dir, SAMConfig(method="fsam", rho=0.1)))
    assert (type(actual), str(actual)) == (type(expected), str(expected))
    if output_dir_exists:
        assert isinstance(actual, ValueError) and "No valid checkpoint found in output directory" in str(actual)


def test_resume_true_with_only_incomplete_checkpoints_says_what_each_lacks(fsam_run, tmp_path):
    """Checkpoint folders that are all cut short: the Trainer's error type and text, then what each folder lacks."""
    output_dir, _ = fsam_run
    copy = tmp_path / "run"
    shutil.copytree(output_dir / "checkpoint-2", copy / "checkpoint-2")
    (copy / "checkpoint-2" / "trainer_state.json").unlink()
    (copy / "checkpoint-4").mkdir(parents=True)
    error = _resume_error(_trainer(copy, SAMConfig(method="fsam", rho=0.1)))
    assert isinstance(error, ValueError)
    assert str(error).startswith(f"No valid checkpoint found in output directory ({copy})")
    assert "checkpoint-2: " in str(error) and "checkpoint-4: " in str(error) and "trainer_state.json" in str(error)


@pytest.mark.parametrize(
    ("saved_method", "new_config"),
    [
        ("fsam", SAMConfig(method="sam", rho=0.1)),
        ("fsam", SAMConfig(method="looksam", rho=0.1, looksam_k=2)),
        ("looksam", SAMConfig(method="fsam", rho=0.1)),
        ("fsam", SAMConfig(method="fsam", rho=0.1, perturbation_sync="local")),
    ],
)
def test_resume_with_a_changed_method_is_an_error_unless_allowed(tmp_path, caplog, saved_method, new_config):
    saved = SAMConfig(method=saved_method, rho=0.1, looksam_k=2 if saved_method == "looksam" else 1)
    _trainer(tmp_path / "run", saved).train()
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    with pytest.raises(ValueError, match="allow_state_reset") as error:
        _trainer(tmp_path / "resumed", new_config).train(resume_from_checkpoint=checkpoint)
    assert "`method`" in str(error.value) or "`perturbation_sync`" in str(error.value)

    allowed = SAMConfig(**{**new_config.to_dict(), "allow_state_reset": True})
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path / "allowed", allowed)
        trainer.train(resume_from_checkpoint=checkpoint)
    assert "starts empty" in caplog.text or "restarts empty" in caplog.text
    assert trainer.state.global_step == 6


def test_resume_with_other_hyperparameters_warns_and_lists_them(tmp_path, caplog):
    _trainer(tmp_path / "run", SAMConfig(method="fsam", rho=0.1)).train()
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path / "resumed", SAMConfig(method="fsam", rho=0.2))
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert "`rho` 0.1 -> 0.2" in caplog.text


@pytest.mark.parametrize(
    "corruption",
    ["truncated", "garbage", "pickled_object", "other_method"],
)
def test_unreadable_state_file_names_the_file_and_never_advises_unsafe_loading(fsam_run, tmp_path, corruption):
    output_dir, _ = fsam_run
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(output_dir / "checkpoint-2", checkpoint)
    path = checkpoint / "sam_state.pt"
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif corruption == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif corruption == "pickled_object":  # torch's own error would advise `weights_only=False`
        torch.save({"method": "fsam", "ema": datetime.date(2026, 1, 1)}, path)
    else:
        torch.save({"method": "looksam", "orthogonal": None}, path)
    trainer = _trainer(tmp_path / "resumed", SAMConfig(method="fsam", rho=0.1))
    with pytest.raises(ValueError) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    message = str(error.value)
    assert str(path) in message
    assert "weights_only=False" not in message and "weights_only" not in message


class _TinyImages(torch.utils.data.Dataset):
    def __init__(self, n=16):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(n, 3, 16, 16, generator=generator)
        self.labels = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def _tiny_vit(seed):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(config)


@pytest.mark.parametrize("trainer_class", [SAMTrainer, Trainer])
def test_resume_restores_weights_saved_under_legacy_names(tmp_path, trainer_class):
    """
    ViT's checkpoints keep transformers 4's weight names, which the Trainer's resume does not map back
    (transformers#43701): the layers would silently restart from their initialisation. SAMTrainer loads them through
    `from_pretrained`; the plain Trainer is the control.
    """

    def run(output_dir, seed, resume=None):
        kwargs = {"sam_config": SAMConfig(rho=0.1)} if trainer_class is SAMTrainer else {}
        args = text_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = trainer_class(model=_tiny_vit(seed), args=args, train_dataset=_TinyImages(), **kwargs)
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        return params_of(trainer.model)

    uninterrupted = run(tmp_path / "full", seed=0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "full" / "checkpoint-2" / "model.safetensors"), framework="pt") as file:
        if set(file.keys()) >= set(uninterrupted):
            pytest.skip("this transformers version saves ViT under its current names: nothing to restore")
    resumed = run(tmp_path / "resumed", seed=1, resume=tmp_path / "full" / "checkpoint-2")
    same = all(torch.equal(p, resumed[name]) for name, p in uninterrupted.items())
    if trainer_class is SAMTrainer:
        assert same
    elif same:
        pytest.skip("the Trainer's resume maps legacy names back in this transformers version")


def test_tied_weights_saved_once_need_no_restore(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from hf_sam.compat import restore_renamed_weights

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    model = BertForMaskedLM(config)  # the decoder is tied to the word embeddings: saved once
    model.save_pretrained(tmp_path)
    assert restore_renamed_weights(model, str(tmp_path)) is False
    vit = _tiny_vit(seed=0)
    vit.save_pretrained(tmp_path / "vit")
    fresh = _tiny_vit(seed=1)
    assert restore_renamed_weights(fresh, str(tmp_path / "vit")) is True
    assert all(torch.equal(p, q) for p, q in zip(vit.state_dict().values(), fresh.state_dict().values()))
