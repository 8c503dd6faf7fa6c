"""The method registry: one class per method, read by the config, the model card, checkpoints and set-up checks."""

import dataclasses

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_sam import METHODS, SAMConfig, SAMVariant, register_method
from hf_sam.checkpointing import checkpoint_problems
from hf_sam.model_card import add_model_card_section, model_card_section
from hf_sam.sam_config import GENERIC_FIELDS
from hf_sam.variants import NumberField

from .testing_utils import SequentialSAMTrainer, TinyDataset, params_of, tiny_args, tiny_model


class PreviousGradientSAM(SAMVariant):
    r"""
    A method defined outside the package: :math:`d_t = g_t + g_{t-1}` (:math:`g_0 = 0`), a state that a checkpoint
    must carry. A non-finite step keeps :math:`g_{t-1}`.
    """

    name = "test-previous"
    display_name = "Previous-gradient SAM"
    paper = ("Nobody et al., 2026", "https://huggingface.co/papers/0000.00000")
    state_key = "previous"
    state_description = "previous step's gradient"
    unsupported = {"local_sync": "a test method keeps one global gradient", "fsdp": "a test method"}

    def __init__(self, config):
        super().__init__(config)
        self.previous = None

    @torch.no_grad()
    def direction(self, grads, grad_norm, *, finite, weight=1.0, last_micro_batch=True):
        if self.previous is None:
            self.previous = [torch.zeros_like(g) for g in grads]
        direction = torch._foreach_add(grads, self.previous)
        for old, new in zip(self.previous, grads, strict=True):
            old.copy_(torch.where(finite, new, old))
        return direction, None

    def state_dict(self):
        return {"previous": None if self.previous is None else [t.clone() for t in self.previous]}

    def load_state_dict(self, state):
        self.previous = None if state["previous"] is None else list(state["previous"])


@pytest.fixture
def registered():
    register_method(PreviousGradientSAM)
    yield PreviousGradientSAM
    METHODS.pop(PreviousGradientSAM.name)


def reference(steps: int, rho: float = 0.1, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """SGD with e = rho d / ||d||, d_t = g_t + g_{t-1}, the applied gradient taken at w + e."""
    model = tiny_model()
    params = list(model.parameters())
    previous = [torch.zeros_like(p) for p in params]
    for batch in TinyDataset().batches(8)[:steps]:
        g = torch.autograd.grad(model(**batch)["loss"], params)
        d = [gi + pi for gi, pi in zip(g, previous)]
        norm = torch.sqrt(sum((di**2).sum() for di in d))
        previous = g
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, di in zip(params, d):
                p.add_(rho * di / (norm + 1e-12))
        applied = torch.autograd.grad(model(**batch)["loss"], params)
        with torch.no_grad():
            for p, w, a in zip(params, saved, applied):
                p.copy_(w - lr * a)
    return params_of(model)


def test_a_method_registered_outside_the_package_trains_saves_resumes_and_is_on_the_card(registered, tmp_path):
    config = SAMConfig(method=registered.name, rho=0.1)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    trainer = SequentialSAMTrainer(
        model=tiny_model(), args=tiny_args(tmp_path / "run", **args), train_dataset=TinyDataset(), sam_config=config
    )
    trainer.train()
    final = params_of(trainer.model)
    for name, expected in reference(steps=4).items():
        torch.testing.assert_close(final[name], expected, rtol=1e-6, atol=1e-6, msg=name)

    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert checkpoint_problems(checkpoint) == []
    (checkpoint / "sam_state.pt").rename(tmp_path / "sam_state.pt")
    assert any("test-previous" in problem for problem in checkpoint_problems(checkpoint))
    (tmp_path / "sam_state.pt").rename(checkpoint / "sam_state.pt")

    resumed = SequentialSAMTrainer(
        model=tiny_model(seed=1), args=tiny_args(tmp_path / "resumed", **args), train_dataset=TinyDataset(),
        sam_config=config,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(p, final[name]) for name, p in resumed.model.named_parameters())

    (tmp_path / "README.md").write_text("# A model\n")  # `create_model_card` needs a Hub model; its section is this
    add_model_card_section(tmp_path / "README.md", config)
    card = (tmp_path / "README.md").read_text()
    assert "Previous-gradient SAM ([Nobody et al., 2026](https://huggingface.co/papers/0000.00000))" in card
    assert "test-previous" in card


def test_the_registry_drives_config_validation_and_the_command_line(registered, tmp_path):
    parser = HfArgumentParser((SAMConfig, TrainingArguments))
    sam_config, _ = parser.parse_args_into_dataclasses(["--method", "test-previous", "--output_dir", str(tmp_path)])
    assert sam_config.method == "test-previous"
    with pytest.raises(ValueError, match="`perturbation_sync` must be 'global'.*keeps one global gradient"):
        SAMConfig(method="test-previous", perturbation_sync="local")
    METHODS.pop(registered.name)
    try:
        with pytest.raises(ValueError, match="`method` must be one of"):
            SAMConfig(method="test-previous")
        with pytest.raises(SystemExit):
            parser.parse_args_into_dataclasses(["--method", "test-previous", "--output_dir", str(tmp_path)])
    finally:
        register_method(registered)


def test_register_method_refuses_what_it_cannot_own():
    class Duplicate(SAMVariant):
        name = "fsam"

    class Stealer(SAMVariant):
        name = "stealer"
        config_fields = {"fsam_sigma": NumberField()}

    class Unknown(SAMVariant):
        name = "unknown"
        config_fields = {"no_such_field": NumberField()}

    class Generic(SAMVariant):
        name = "generic"
        config_fields = {"rho": NumberField()}

    class Feature(SAMVariant):
        name = "feature"
        unsupported = {"pipelining": "no"}

    for cls, match in [
        (Duplicate, "already registered"),
        (Stealer, "owned by 'fsam'"),
        (Unknown, "`no_such_field`"),
        (Generic, "`rho`"),
        (Feature, "pipelining"),
    ]:
        with pytest.raises(ValueError, match=match):
            register_method(cls)
        assert cls.name not in METHODS or METHODS[cls.name] is not cls
    with pytest.raises(TypeError):
        register_method(object)


def test_every_config_field_is_generic_or_owned_by_exactly_one_method():
    owners = {}
    for cls in METHODS.values():
        for name in cls.config_fields:
            assert name not in owners, f"`{name}` owned by {owners[name]} and {cls.name}"
            owners[name] = cls.name
    fields = {f.name for f in dataclasses.fields(SAMConfig)}
    assert fields == set(GENERIC_FIELDS) | set(owners)
    assert not set(GENERIC_FIELDS) & set(owners)
    for cls in METHODS.values():  # the built-ins, registered without `register_method`, pass its checks
        register_method(cls)


@pytest.mark.parametrize("name", ["sam", "fsam", "vasso", "gsam", "aesam", "looksam"])
def test_every_built_in_method_is_on_the_model_card_with_its_paper(name):
    cls = METHODS[name]
    section = model_card_section(SAMConfig(method=name))
    assert f"{cls.display_name} ([{cls.paper[0]}]({cls.paper[1]}))" in section
    assert cls.paper[1].startswith("https://huggingface.co/papers/")


def test_a_subclass_of_a_built_in_shares_its_fields(tmp_path):
    """F-SAM's rule with another name: it owns F-SAM's fields too (they stay validated), and trains like F-SAM."""

    class RenamedFriendlySAM(METHODS["fsam"]):
        name = "test-fsam"

    register_method(RenamedFriendlySAM)
    try:
        with pytest.raises(ValueError, match="`fsam_lambda`"):
            SAMConfig(method="test-fsam", fsam_lambda=1.5)
        runs = {}
        for method in ("fsam", "test-fsam"):
            trainer = SequentialSAMTrainer(
                model=tiny_model(), args=tiny_args(tmp_path / method), train_dataset=TinyDataset(),
                sam_config=SAMConfig(method=method, rho=0.1, fsam_lambda=0.5),
            )  # fmt: skip
            trainer.train()
            runs[method] = params_of(trainer.model)
        assert all(torch.equal(p, runs["test-fsam"][name]) for name, p in runs["fsam"].items())
    finally:
        METHODS.pop("test-fsam")


@pytest.mark.parametrize(
    ("old", "module", "new"),
    [
        ("VARIANTS", "hf_sam.variants", "METHODS"),
        ("global_norm", "hf_sam.perturbation", "global_norm"),
        ("perturb_", "hf_sam.perturbation", "perturb_"),
        ("restore_", "hf_sam.perturbation", "restore_"),
        ("sam_perturbation_", "hf_sam.perturbation", "sam_perturbation_"),
    ],
)
def test_old_top_level_names_still_load_with_a_deprecation_warning(old, module, new):
    import importlib

    import hf_sam

    assert old not in hf_sam.__all__
    with pytest.warns(FutureWarning, match=f"`hf_sam.{old}` is deprecated.*`{module}.{new}`"):
        value = getattr(hf_sam, old)
    assert value is getattr(importlib.import_module(module), new)
    with pytest.raises(AttributeError):
        hf_sam.no_such_name  # noqa: B018
