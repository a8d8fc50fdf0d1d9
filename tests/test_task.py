"""tasks/pycode.py: every rule of the judge, its calibration on the real held-out functions (real bodies solve,
known hacks do not), chrF and pass@k against hand computations, the labeler's grades, and evaluate_policy."""
import contextlib
import copy
import json
import os
import random
import re

import pytest
import torch

from common import complete, read_prompts
from model import GPT, GPTConfig
from tasks import pycode as task
from tokenizer import get_tokenizer

F = 'def f(self, path, mode="r"):\n    """Open path in mode."""\n'
G = 'def g(x):\n    """Twice x."""\n'
H = 'def h(cls):\n    """The class name."""\n'


def solved(prompt, completion):
    return task.judge([prompt], [completion])[0]["solved"]


def test_a_completion_cut_off_at_the_length_limit_does_not_solve():
    assert task.judge([G], ["    return 2 * x\n"], ended=[True])[0]["solved"]
    assert not task.judge([G], ["    return 2 * x\n"], ended=[False])[0]["solved"]  # parses, but never ended


def test_a_body_must_parse_as_the_body_of_the_declared_function():
    assert solved(F, "    return open(path, mode)\n")
    assert not solved(F, "    return open(path, mode\n")  # does not parse
    assert not solved(F, "    return path\nprint(path)\n")  # code after the function, at module level
    assert not solved(F, "    return path\ndef other():\n    pass\n")
    assert task.body_statements(F, "    return path\n    \n") is not None  # trailing blank lines are fine
    assert task.declared_function("x = 1\n") is None and task.argument_names("not python(") == []


@pytest.mark.parametrize("body", ["", "\n", "    pass\n", "    ...\n", "    return\n", "    return None\n",
                                  "    raise NotImplementedError\n", "    raise NotImplementedError('later')\n",
                                  '    """Another docstring."""\n', "    # nothing yet\n", "    pass\n    return\n"])
def test_trivial_bodies_never_solve(body):
    v = task.judge([G], [body])[0]
    assert v["parses"] and v["trivial"] and not v["solved"]


def test_a_function_with_arguments_needs_a_body_that_reads_one():
    assert solved(F, "    return self.opener(path)\n")
    assert solved(F, "    self.log(mode)\n")
    assert not solved(F, "    return self.opener(self.path)\n")  # an attribute named like the argument is not it
    assert not solved(F, "    return self._state()\n")
    assert not solved(F, "    path = 1\n") and task.judge([F], ["    path = 1\n"])[0]["reads_args"] is False
    assert solved(G, "    x += x\n    return x\n")  # an in-place update reads it
    assert solved(G, "    return [y for y in x]\n")
    # self and cls are not arguments: a method that takes only them may read anything
    assert task.argument_names(H) == [] and solved(H, "    return cls.__name__\n")
    assert task.judge([H], ["    return 1\n"])[0]["reads_args"] is None
    assert task.argument_names('def k(self, a, /, b=1, *c, d, **e):\n    """D."""\n') == ["a", "b", "c", "d", "e"]


def test_a_body_given_to_three_prompts_is_a_template_for_each_of_them():
    prompts = [f'def f{i}(v{i}):\n    """Doc {i}."""\n' for i in range(4)]
    bodies = [f"    return v{i}\n" for i in range(4)]  # the same body once the arguments are placeholders
    assert task.normalized_body(task.body_statements(prompts[0], bodies[0]), ["v0"]) == "return _a0"
    assert [v["template"] for v in task.judge(prompts[:2], bodies[:2])] == [False, False]
    assert [v["template"] for v in task.judge(prompts[:3], bodies[:3])] == [True] * 3
    assert not any(v["solved"] for v in task.judge(prompts, bodies))
    # several samples of one prompt count once: the same answer to the same question is no template
    assert not any(v["template"] for v in task.judge(prompts[:1] * 5, bodies[:1] * 5))
    # layout and comments do not hide a template
    same = ["    return v0  # ok\n", "    return (v1)\n", "    return v2\n"]
    assert all(v["template"] for v in task.judge(prompts[:3], same))


def test_chrf_against_a_hand_computation():
    # "ab" against "abc", orders 1 and 2: P = (2/2 + 1/1) / 2 = 1, R = (2/3 + 1/2) / 2 = 7/12,
    # F2 = 5 P R / (4 P + R) = (35/12) / (55/12) = 7/11
    assert task.chrf("ab", "abc", max_order=2) == pytest.approx(7 / 11)
    assert task.chrf("return x", "return x") == 1.0 and task.chrf(" return  x\n", "returnx") == 1.0
    assert task.chrf("zzz", "abc") == 0.0 and task.chrf("", "abc") == 0.0


def test_pass_at_k_is_any_of_k_samples_solving():
    prompts = [G, H]
    samples = ["    pass\n", "    return 2 * x\n",  # G: the second sample solves it
               "    pass\n", "    return\n"]  # H: none does
    assert task.pass_at_k(prompts, samples, 2) == (0.5, 1.0)


def test_reports_show_functions_that_take_arguments_first_in_file_order():
    import tasks
    prompts = ['def a(self):\n    """A."""\n', 'def b(x):\n    """B."""\n', 'def c():\n    """C."""\n',
               'def d(self, y, z=1):\n    """D."""\n']
    assert task.showcase(prompts) == [1, 3, 0, 2]
    assert tasks.shown(task, prompts, 3) == [1, 3, 0]
    assert tasks.shown(tasks.load("alpaca"), prompts, 2) == [0, 1]  # a task without an order: the first ones


def test_grades_rank_solved_over_ignoring_over_trivial_over_broken():
    completions = ["    return g2(x)\n", "    return 2\n", "    pass\n", "    return (x\n", "    return g3(x)\n"]
    assert task.grade([G] * 5, completions, [True, True, True, True, False]) == [task.SOLVED, 2, 1, 0, 0]


def test_reward_is_one_for_a_solving_completion_judged_with_the_batch():
    prompts = [f'def f{i}(v{i}):\n    """Doc {i}."""\n' for i in range(3)]
    assert task.reward(prompts[:1], ["    return v0 + 1\n"]) == [1.0]
    assert task.reward(prompts, [f"    return v{i} + 1\n" for i in range(3)]) == [0.0, 0.0, 0.0]  # a template
    # earlier responses judged beside the batch: the same body for two earlier prompts makes it a template now
    earlier = [(prompts[1], "    return v1 + 1\n"), (prompts[2], "    return v2 + 1\n")]
    assert task.reward(prompts[:1], ["    return v0 + 1\n"], context=earlier) == [0.0]
    assert task.reward(prompts[:1], ["    return v0 + 1\n"], context=earlier[:1]) == [1.0]


# ------------------------------------------------------------------------------------------------------------
# calibration on the real held-out functions of this machine's standard library

@pytest.fixture(scope="module")
def held_out(stdlib_data):
    rows = [json.loads(line) for line in open(os.path.join(stdlib_data, "prompts_eval.jsonl"))]
    return [r["prompt"] for r in rows], [r["reference"] for r in rows]


def test_the_real_bodies_solve_their_prompts(held_out):
    prompts, references = held_out
    m = task.summarize(prompts, references, references)
    assert len(prompts) > 150 and m["n_args"] > 60
    assert m["solved"] >= 0.85 and m["solved_args"] >= 0.85 and m["parses"] == 1.0
    assert m["chrf"] == 1.0


def _with_args(prompts, references):
    return [(p, r) for p, r in zip(prompts, references) if task.argument_names(p)]


def test_known_hacks_do_not_solve(held_out):
    prompts, references = held_out
    n = len(prompts)
    share = lambda ps, cs: sum(task.reward(ps, cs)) / len(cs)
    # one fixed body for every prompt, valid everywhere
    assert share(prompts, ["    return self._state()\n"] * n) <= 0.05
    # bodies that do nothing
    for body in ("", "    pass\n", "    ...\n", "    return None\n"):
        assert share(prompts, [body] * n) <= 0.05
    # return the first argument (self for a method), for every prompt: valid, reads an argument, a template
    first = [f"    return {task.parameters(task.declared_function(p))[0]}\n" if task.parameters(
        task.declared_function(p)) else "    return 0\n" for p in prompts]
    assert share(prompts, first) <= 0.05
    args = _with_args(prompts, references)
    ps = [p for p, _ in args]
    # for functions with arguments: the body of another function that reads none of this one's arguments
    rng = random.Random(0)
    others = []
    for p, r in args:
        names = set(task.argument_names(p))
        pool = [o for o in references if o != r and task.body_statements(p, o) is not None
                and not task.reads_any(task.body_statements(p, o), names)]
        others.append(rng.choice(pool))
    assert share(ps, others) <= 0.05
    # the real body with the arguments renamed
    renamed = []
    for p, r in args:
        for i, a in enumerate(task.argument_names(p)):
            r = re.sub(rf"\b{re.escape(a)}\b", f"renamed_{i}", r)
        renamed.append(r)
    assert share(ps, renamed) <= 0.05


# ------------------------------------------------------------------------------------------------------------
# evaluate_policy

def test_evaluate_policy_measures_greedy_and_sampled_completions():
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=257))
    eval_set = task.EvalSet(inputs=[G, H], prompts=[G, H], references=["    return 2 * x\n", "    return cls.x\n"])
    m, completions = task.evaluate_policy(model, tok, eval_set, 8, samples=3, ref_model=model, seed=1)
    assert len(completions) == 2 and m["n_prompts"] == 2 and m["n_args"] == 1
    for key in ("solved", "solved_args", "parses", "template", "chrf", "distinct", "mean_length", "pass@3",
                "pass@3_args", "kl"):
        assert key in m, key
    assert m["kl"] == 0.0  # the policy passed as its own reference (before any update): 0, not estimated
    estimated, _ = task.evaluate_policy(model, tok, eval_set, 8, samples=3, ref_model=copy.deepcopy(model), seed=1)
    assert estimated["kl"] == pytest.approx(0.0, abs=1e-5)  # a copy of it: log pi - log pi_ref estimated, ~0
    assert 1 <= m["mean_length"] <= 9  # at most 8 new tokens and the end-of-text
    again, _ = task.evaluate_policy(model, tok, eval_set, 8, samples=3, ref_model=model, seed=1)
    assert again == m  # the same seed gives the same samples
    scored, _ = task.evaluate_policy(model, tok, eval_set, 8, samples=0, scorer=lambda rows: torch.ones(len(rows)))
    assert scored["rm_score"] == 1.0 and "kl" not in scored and "pass@3" not in scored


def test_complete_gives_k_samples_per_prompt_in_the_order_of_the_prompts_with_their_log_probabilities():
    """complete() batches prompts in order of length and runs each prompt once for its k samples; what comes back
    is in the order of the prompts, k rows per prompt, and each sample's log-probability is the model's own."""
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=257))
    prompts = ["def long_function_name(a, b):\n", "x", "def f(y):\n", "ab", "class C:\n"]  # lengths out of order
    texts, rows, logprobs = complete(model, tok, prompts, 6, batch_size=4, greedy=False, samples=2,
                                     generator=torch.Generator().manual_seed(0), with_logprobs=True)
    assert len(texts) == len(rows) == len(logprobs) == 10
    assert [p for p, _ in rows] == [tok.encode(p) for p in prompts for _ in range(2)]
    assert texts == [tok.decode(r[:-1] if r[-1:] == [tok.eot_token] else r) for _, r in rows]
    forward = task.sequence_logprobs(model, rows, "cpu", contextlib.nullcontext())  # batched by length too
    assert torch.allclose(torch.tensor(logprobs), forward, atol=1e-4)
    # each prompt run once for its 2 responses (its keys and values shared): the same log-probabilities
    shared = task.sequence_logprobs(model, rows, "cpu", contextlib.nullcontext(), batch_size=4, samples=2)
    assert torch.allclose(shared, forward, atol=1e-5)
    with pytest.raises(ValueError, match="2 to a prompt"):
        task.sequence_logprobs(model, rows[1:] + rows[:1], "cpu", contextlib.nullcontext(), samples=2)
    _, greedy_rows = complete(model, tok, prompts, 6, batch_size=3)
    assert [p for p, _ in greedy_rows] == [tok.encode(p) for p in prompts]


def test_read_eval_set_keeps_prompts_that_fit_and_their_references(tmp_path):
    tok = get_tokenizer("byte")
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": G, "reference": "    return 2 * x\n"},
                                                      {"prompt": F * 20, "reference": "    pass\n"}]) + "\n")
    s = task.read_eval_set(str(path), tok, "none", 100)
    assert (s.prompts, s.references, s.dropped) == ([G], ["    return 2 * x\n"], 1)
    with pytest.raises(SystemExit, match="longer than 5 tokens"):
        task.read_eval_set(str(path), tok, "none", 5)
    for read in (task.read_eval_set, read_prompts):  # max_new_tokens >= block_size
        with pytest.raises(SystemExit, match="max_new_tokens leaves no room for a prompt"):
            read(str(path), tok, "none", -99744)
