"""Evaluation: a model's greedy answers to a JSONL file of examples, scored with the metric of
each example's task (npvlm/metrics).

    predict.py   the answers, in batches, with a progress bar
    score.py     task_of (which metric), ground_truth (against what), score_task (the scores)
    run.py       evaluate: predict, then score every task -> Evaluation (what
                 `python -m npvlm.evaluate` and `finetune --val` report)
"""
