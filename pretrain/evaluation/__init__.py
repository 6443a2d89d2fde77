"""Evaluation: eval_loss, perplexity and bits per byte on the held-out blocks, and multiple-choice tasks scored as
lm-eval-harness scores them.

It may import the base, data and model. It must not change the model's weights or the training data's order, and
it is charged to its own time, never to training's tokens/s.

Modules:
heldout       eval_loss, perplexity and bits per byte on the held-out blocks, per source of a mixture
              (model.chunked_loss, data.mixture)
benchmarks    C-Eval, CMMLU and MMLU subjects as lm-eval-harness names, prompts and groups them
tasks         multiple-choice tasks from local files, scored as lm-eval-harness scores them (benchmarks)
lm_eval_tasks  the recipe: lm-eval task files over a run's --eval_tasks files, and the command that runs them
              (benchmarks, tasks)
"""
