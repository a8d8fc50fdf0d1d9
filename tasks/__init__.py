"""Tasks: one module per task, holding its data reading, judge, reward and evaluation (see tasks/pycode.py).

A stage names its task with the config key `task` ('pycode', 'imdb', 'hh_rlhf', 'alpaca') and calls the module's
functions; changing the task means changing that module and its data folder, never a training script. Every task
module has

    read_eval_set(path, tok, template, max_prompt_tokens, limit=0)   its held-out prompts (an EvalSet)
    evaluate_policy(model, tok, eval_set, max_new_tokens, device, autocast, samples, ref_model, scorer, seed,
                    batch_size)      its held-out measures of a policy: (measures, one completion per prompt)
    describe(measures)               one line of them
    MEASURES, CURVES                 [(label, key)]: the rows of the before/after tables, the curves plotted

and may have showcase(prompts), the order in which reports show held-out completions (pycode: functions that take
arguments first, where a reader can see whether a body belongs to its prompt); `shown` picks them.

and, where the task has them, reward(prompts, completions, ended, context) (a verifiable reward, for RL) and
grade(prompts, completions, ended) with SOLVED (the labeler collect_pairs.py ranks samples with). A task without
a judge (alpaca) measures what it can and says so; its stages are measured by their held-out loss.
"""
import importlib
import pkgutil

from common import UserError


def names():
    """The tasks there are: the modules of this folder."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def shown(task, prompts, k):
    """Indices of the k held-out prompts whose completions a report shows: the first k in the task's showcase
    order where it has one, else the first k."""
    order = task.showcase(prompts) if hasattr(task, "showcase") else range(len(prompts))
    return list(order)[:k]


def load(name):
    """The module tasks/<name>.py; an unknown name is a one-line error naming the tasks there are."""
    if name not in names():
        raise UserError(f"unknown task {name!r}; the tasks are {', '.join(names())} (modules in tasks/)")
    return importlib.import_module(f"tasks.{name}")
