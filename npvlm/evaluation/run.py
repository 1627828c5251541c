"""Evaluate a model on examples: every example's ground truth checked first, then the greedy
answers, then each task's scores."""

import time
from dataclasses import dataclass

from ..errors import InputError
from .predict import predict
from .score import ground_truth, score_task, task_of

SCORED_AS = {"detect": "objects", "refexp": "box_yxyx", "segment": "box_yxyx"}


@dataclass
class Evaluation:
    tasks: dict             # task -> TaskScore, in the order the tasks first appear
    rows: list              # per example, in file order: what --predictions writes
    seconds: float


def check_examples(examples, task="auto", divisor=1024, vae=None):
    """(task per example, ground truth per example), every line checked before any answer is
    generated: one-line InputErrors naming the file and line."""
    tasks = [task_of(e, task) for e in examples]
    return tasks, [ground_truth(e, t, divisor, vae) for e, t in zip(examples, tasks)]


def check_prompt_lengths(examples, processor, cfg, max_new_tokens):
    """Each prompt + max_new_tokens within the model's positions, before any answer is made
    (the processor alone: no weights needed)."""
    limit, N = cfg.text.max_position_embeddings, cfg.num_image_tokens
    for e in examples:
        n = len(processor.tokenizer.prompt_ids(e.prefix, N)[0])
        if n + max_new_tokens > limit:
            raise InputError(f"{e.source} line {e.line}: the prompt ({n} tokens, {N} of them image tokens) + "
                             f"--max-new-tokens {max_new_tokens} exceed the model's {limit} positions; shorten "
                             "the prompt or lower --max-new-tokens")


def evaluate(model, examples, task="auto", batch_size=8, max_new_tokens=64, divisor=1024, vae=None, quiet=False,
             checked=None, desc="evaluating"):
    """Answer every example greedily and score it with its task's metric (npvlm/evaluation/score.py).
    checked: `check_examples`' result, if already computed."""
    tasks, truths = checked or check_examples(examples, task, divisor, vae)
    t0 = time.perf_counter()
    generations = predict(model, examples, batch_size, max_new_tokens, logprobs="detect" in tasks, quiet=quiet,
                          desc=desc)
    results, rows = {}, [None] * len(examples)
    for name in sorted(set(tasks), key=tasks.index):
        idx = [i for i, t in enumerate(tasks) if t == name]
        ts = score_task(name, [examples[i] for i in idx], [generations[i] for i in idx], [truths[i] for i in idx],
                        model.processor.tokenizer, divisor, vae)
        results[name] = ts
        for j, i in enumerate(idx):
            e = examples[i]
            rows[i] = {"line": e.line, "image": str(e.image), "prefix": e.prefix, "task": name,
                       "prediction": generations[i].text, "references": ts.truths[j], "score": ts.scores[j]}
            if name in SCORED_AS:                  # what was read from the answer, where it is not the text
                rows[i][SCORED_AS[name]] = ts.outputs[j]
    return Evaluation(results, rows, time.perf_counter() - t0)

