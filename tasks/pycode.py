"""
The task of the small-scale course, in one place: write the body of a documented Python function.

A prompt is a function's `def` line and its docstring, dedented to column 0; its reference is the real body from
the standard library (data/pycode/prepare.py makes both). Everything a stage needs to know about the task lives
here, so that changing the task means changing this module and its data folder, never a training script:

    read_eval_set(path, tok, template, max_prompt_tokens)   the held-out prompts and their real bodies (EvalSet)
    judge(prompts, completions)      does each completion solve its prompt? (the rules below; code is never run)
    reward(prompts, completions)     the judge as a reward an RL stage can optimise (1 solved, 0 not)
    grade(prompts, completions)      the labeler that ranks samples for the reward model (collect_pairs.py)
    evaluate_policy(model, tok, eval_set, ...)   the held-out measures every stage reports

A completion SOLVES its prompt when all of these hold:
  0. it ended: the model stopped by itself (end-of-text) within the length limit, rather than being cut off;
  1. it parses as the body of the declared function (prompt + completion is that one function, nothing after it);
  2. it is not trivial: not empty, `pass`, `...`, a bare or `None` return, `raise NotImplementedError`, a string;
  3. where the function takes arguments besides self/cls, the body reads at least one of them;
  4. it is not a template: with the function's own argument names replaced by placeholders, the same body given
     to TEMPLATE_PROMPTS or more different prompts is a template, for every one of them.
Why 3: among the functions that take arguments, the real body reads one 91% of the time; a body that reads none
is, far more often than not, the body of some other function. Why 4: a policy rewarded for valid code finds one
body that is valid everywhere (`return x`, `return self._state()`) and answers every prompt with it. Why three
prompts: of the 362 held-out real bodies, 4 bodies are shared by three or more functions (16 functions: `return
False` by seven, tkinter's siblings), 6 by exactly two; so two would fail more real code, and any higher count lets a
template through on small batches. There is no cliff: a body is a template from its third
prompt on, whether it answers 1% or 90% of them.

What the rules cannot see: for a method that takes only `self`, the body of another such method is still valid
code that reads no argument it should. The similarity to the real body (chrF, `chrf`) is reported beside
"solved" for that reason, and so are the distinct bodies per prompt.
"""
import ast
import contextlib
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from model import KVCache
from common import complete, read_jsonl, text_field, format_prompt, UserError, batch_rows, batches_by_length

TEMPLATE_PROMPTS = 3  # a normalised body given to this many different prompts is a template (see above)
NOT_ARGUMENTS = {"self", "cls"}  # the receiver is not an argument a body must read


# ----------------------------------------------------------------------------------------------------------
# prompts and references

@dataclass
class EvalSet:
    """Held-out prompts with their reference bodies. inputs are what the model reads (the prompt with the stage's
    template applied); prompts are as written, a def line and a docstring: what the judge reads."""
    inputs: list
    prompts: list
    references: list
    dropped: int = 0  # prompts left out for leaving too little room to answer


def read_eval_set(path, tok, template, max_prompt_tokens, limit=0):
    """The held-out prompts {"prompt", "reference"} of a JSONL file whose formatted prompt fits in max_prompt_tokens
    (the first `limit` of them when limit > 0)."""
    if max_prompt_tokens < 1:
        raise UserError("max_new_tokens leaves no room for a prompt in the model's context; lower it below block_size")
    inputs, prompts, references, dropped = [], [], [], 0
    for n, obj in read_jsonl(path):
        prompt = text_field(obj, "prompt", f"{path}:{n}")
        text = format_prompt(prompt, template)
        if len(tok.encode(text)) > max_prompt_tokens:
            dropped += 1
            continue
        inputs.append(text)
        prompts.append(prompt)
        references.append(obj.get("reference") or "")
    if not inputs:
        raise UserError(f"{path}: every prompt is longer than {max_prompt_tokens} tokens; lower max_new_tokens")
    if limit:
        inputs, prompts, references = inputs[:limit], prompts[:limit], references[:limit]
    return EvalSet(inputs, prompts, references, dropped)


def _parse(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like: noise, not errors
        try:
            return ast.parse(text)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return None


def declared_function(prompt):
    """The ast of the function a prompt declares (the docstring is its whole body), or None."""
    tree = _parse(prompt)
    if tree is None or len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    return tree.body[0]


def parameters(fn):
    """Every parameter of a function in order: positional-only, positional, *args, keyword-only, **kwargs."""
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + ([a.vararg] if a.vararg else []) + a.kwonlyargs
            + ([a.kwarg] if a.kwarg else [])]


def argument_names(prompt):
    """The arguments a body should read: the declared function's parameters without self/cls, in order."""
    fn = declared_function(prompt)
    return [] if fn is None else [p for p in parameters(fn) if p not in NOT_ARGUMENTS]


# ----------------------------------------------------------------------------------------------------------
# the judge

def body_statements(prompt, completion):
    """The statements the completion adds to the declared function, or None when prompt + completion is not that
    one function (it does not parse, or code follows the function at a lower indentation)."""
    fn = declared_function(prompt)
    tree = _parse(prompt + completion)
    if fn is None or tree is None or len(tree.body) != 1:
        return None
    full = tree.body[0]
    if not isinstance(full, type(fn)) or full.name != fn.name:
        return None
    return full.body[len(fn.body):]


def is_trivial_statement(stmt):
    """pass, ..., a bare return or `return None`, raise NotImplementedError, a lone string (a second docstring)."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Return):
        return stmt.value is None or (isinstance(stmt.value, ast.Constant) and stmt.value.value is None)
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return stmt.value.value is Ellipsis or isinstance(stmt.value.value, str)
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def is_trivial(statements):
    """A body that does nothing the docstring asks for: no statements, or only trivial ones."""
    return all(is_trivial_statement(s) for s in statements)


def reads_any(statements, names):
    """Does the body read (load, or update in place with +=) any of these names?"""
    for node in ast.walk(ast.Module(body=list(statements), type_ignores=[])):
        if isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load):
            return True
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id in names:
            return True
    return False


class _Placeholders(ast.NodeTransformer):
    def __init__(self, mapping):
        self.mapping = mapping

    def visit_Name(self, node):
        node.id = self.mapping.get(node.id, node.id)
        return node

    def visit_arg(self, node):  # a lambda's or nested function's parameter of the same name
        node.arg = self.mapping.get(node.arg, node.arg)
        return node


def normalized_body(statements, arguments):
    """The body as canonical source (comments and layout gone) with the function's own arguments replaced by
    placeholders _a0, _a1, ... in their declared order: `return x` for f(x) and `return y` for g(y) are one body."""
    mapping = {name: f"_a{i}" for i, name in enumerate(arguments)}
    module = ast.Module(body=[_Placeholders(mapping).visit(s) for s in statements], type_ignores=[])
    return ast.unparse(module)


def judge(prompts, completions, ended=None, template_prompts=TEMPLATE_PROMPTS):
    """One verdict per completion: {ended, parses, trivial, takes_args, reads_args, template, solved, body}.

    The completions are judged together, because a template is only visible across prompts: a normalised body
    given to template_prompts or more *different* prompts (several samples of one prompt count once) is a template
    for all of them. takes_args is False and reads_args None for functions with no argument but self/cls.
    ended[i] says whether completion i ended with end-of-text (None: all did, e.g. real bodies)."""
    ended = [True] * len(completions) if ended is None else ended
    verdicts = []
    for prompt, completion, done in zip(prompts, completions, ended):
        statements = body_statements(prompt, completion)
        arguments = argument_names(prompt)
        v = {"ended": bool(done), "parses": statements is not None, "takes_args": bool(arguments),
             "reads_args": None, "trivial": None, "template": False, "body": None}
        if statements is not None:
            v["trivial"] = is_trivial(statements)
            v["reads_args"] = reads_any(statements, set(arguments)) if arguments else None
            v["body"] = normalized_body(statements, arguments)
        verdicts.append(v)
    prompts_of = defaultdict(set)
    for prompt, v in zip(prompts, verdicts):
        if v["body"] is not None:
            prompts_of[v["body"]].add(prompt)
    for v in verdicts:
        v["template"] = v["body"] is not None and len(prompts_of[v["body"]]) >= template_prompts
        v["solved"] = (v["ended"] and v["parses"] and not v["trivial"] and v["reads_args"] is not False
                       and not v["template"])
    return verdicts


def reward(prompts, completions, ended=None, context=(), template_prompts=TEMPLATE_PROMPTS):
    """The task's verifiable reward, for RL: 1.0 for a completion that solves its prompt, else 0.0. The completions
    are judged together with `context`, earlier (prompt, completion) pairs that get no reward of their own: a batch
    of a few prompts rarely shows a template three times, but a body reused across the last rollouts is caught."""
    ended = [True] * len(completions) if ended is None else list(ended)
    verdicts = judge([p for p, _ in context] + list(prompts), [c for _, c in context] + list(completions),
                     [True] * len(context) + ended, template_prompts)
    return [float(v["solved"]) for v in verdicts[len(context):]]


SOLVED = 3  # the top grade


def grade(prompts, completions, ended):
    """The labeler's rank of each sample (collect_pairs.py pairs a sample that solves its prompt, chosen, with one
    that does not, rejected): 3 solves its prompt; 2 valid, not trivial, but ignores the arguments or is a template;
    1 valid but trivial; 0 does not parse, or never ended (cut off at the length limit)."""
    grades = []
    for v in judge(prompts, completions, ended):
        if not (v["parses"] and v["ended"]):
            grades.append(0)
        elif v["solved"]:
            grades.append(SOLVED)
        else:
            grades.append(1 if v["trivial"] else 2)
    return grades


# ----------------------------------------------------------------------------------------------------------
# similarity to the real body

def showcase(prompts):
    """The order in which reports show completions: functions that take arguments first (there a reader sees
    whether a body reads its prompt's names), then the others, each in file order."""
    return sorted(range(len(prompts)), key=lambda i: not argument_names(prompts[i]))


def chrf(hypothesis, reference, max_order=6, beta=2.0):
    """chrF (Popovic 2015): the character n-gram F-score, n = 1..6, whitespace removed, recall weighted beta = 2
    times as much as precision; 0 (nothing shared) to 1 (identical). Precision and recall are each averaged over
    the orders both texts are long enough for, then combined: F = (1 + b^2) P R / (b^2 P + R)."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, max_order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue
        matches = sum((h & r).values())
        precisions.append(matches / sum(h.values()))
        recalls.append(matches / sum(r.values()))
    if not precisions:
        return float(hyp == ref)
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return 0.0 if p + r == 0 else (1 + beta ** 2) * p * r / (beta ** 2 * p + r)


# ----------------------------------------------------------------------------------------------------------
# the held-out evaluation every stage reports

def summarize(prompts, completions, references, ended=None):
    """The measures of one completion per prompt: solved (all prompts, and those that take arguments), parses,
    trivial, reads the arguments, template share, similarity to the real body, distinct bodies per prompt."""
    verdicts = judge(prompts, completions, ended)
    n = len(verdicts)
    with_args = [v for v in verdicts if v["takes_args"]]
    share = lambda vs, key: sum(bool(v[key]) for v in vs) / len(vs) if vs else 0.0
    return {
        "solved": share(verdicts, "solved"),
        "solved_args": share(with_args, "solved"),
        "parses": share(verdicts, "parses"),
        "trivial": share(verdicts, "trivial"),
        "reads_args": share(with_args, "reads_args"),
        "template": share(verdicts, "template"),
        "chrf": sum(chrf(c, r) for c, r in zip(completions, references)) / n,
        "distinct": len({c.strip() for c in completions}) / n,
        "most_common_share": Counter(c.strip() for c in completions).most_common(1)[0][1] / n,
        "n_prompts": n, "n_args": len(with_args),
    }


def pass_at_k(prompts, samples, k, ended=None):
    """pass@k: the share of prompts for which any of k samples solves it (all, and those with arguments). samples
    holds k completions per prompt, prompt by prompt; all are judged together (templates across prompts)."""
    verdicts = judge([p for p in prompts for _ in range(k)], samples, ended)
    solved = [any(v["solved"] for v in verdicts[i * k:(i + 1) * k]) for i in range(len(prompts))]
    args = [s for s, p in zip(solved, prompts) if argument_names(p)]
    return sum(solved) / len(solved), (sum(args) / len(args) if args else 0.0)


@torch.no_grad()
def sequence_logprobs(model, rows, device, autocast, batch_size=64, samples=1):
    """log p(response | prompt) of each (prompt ids, response ids) row: the sum over the response's tokens. Rows
    are batched in order of length, so that a batch pads to about its own rows' width.

    samples = k > 1: the rows come k to a prompt, as complete(samples=k) returns them. Each prompt is then run once
    and its keys and values shared by its k responses (a held-out prompt is ~3x longer than its response: this
    takes the reference's forward pass in an evaluation from 8.5 to 5.5 s on one thread)."""
    out = torch.empty(len(rows))
    k = samples
    if len(rows) % k or any(rows[i][0] != rows[i - i % k][0] for i in range(len(rows))):
        raise ValueError(f"samples={k}: the rows must come {k} to a prompt, the prompt's rows one after another")
    for groups in batches_by_length([len(rows[g * k][0]) for g in range(len(rows) // k)], max(1, batch_size // k)):
        batch = [g * k + j for g in groups for j in range(k)]
        seqs, attn, P = batch_rows([rows[i] for i in batch], 0, device)
        responses = seqs[:, P:]
        with autocast:
            if k == 1:
                hidden = model.hidden_states(seqs, attn)[:, P - 1:-1]  # the state before each response token
            else:
                cache = KVCache(model.config.n_layer, seqs.size(1))
                last = model.hidden_states(seqs[::k, :P], attn[::k, :P], cache)[:, -1:]  # each prompt once
                cache.repeat(k)  # its keys and values, once per response
                hidden = torch.cat([last.repeat_interleave(k, dim=0),
                                    model.hidden_states(responses[:, :-1], attn[:, :-1], cache)], dim=1)
            logp = model.token_logprobs(hidden, responses).float()
        out[batch] = (logp * attn[:, P:]).sum(dim=1).cpu()
    return out.to(device)


@torch.no_grad()
def evaluate_policy(model, tok, eval_set, max_new_tokens, device="cpu", autocast=None, samples=8, ref_model=None,
                    scorer=None, seed=0, batch_size=64):
    """Every held-out measure of a policy, the same way in every stage. Returns (measures, greedy completions).

    Greedy completions give solved, parses, template share, similarity to the real body (chrF), distinct bodies,
    length and, with a scorer (rows -> scores, e.g. the reward model), its mean score. `samples` completions per
    prompt at temperature 1 give pass@k (k = samples) and, with a ref_model, the KL to it in nats per response:
    the mean over samples of log pi(y|x) - log pi_ref(y|x), an unbiased estimate of KL(pi || pi_ref); ref_model=model
    (the policy before any update) gives 0 without estimating it."""
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    completions, rows = complete(model, tok, eval_set.inputs, max_new_tokens, batch_size=batch_size, device=device,
                                 autocast=autocast)
    ended = [r[-1:] == [tok.eot_token] for _, r in rows]
    result = summarize(eval_set.prompts, completions, eval_set.references, ended)
    result["mean_length"] = sum(len(r) for _, r in rows) / len(rows)
    result["no_eot_share"] = 1 - sum(ended) / len(ended)
    if scorer is not None:
        result["rm_score"] = scorer(rows).float().mean().item()
    if samples > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
        sampled, sampled_rows, logprobs = complete(model, tok, eval_set.inputs, max_new_tokens, batch_size=batch_size,
                                                   device=device, autocast=autocast, greedy=False, temperature=1.0,
                                                   generator=generator, samples=samples, with_logprobs=True)
        sampled_ended = [r[-1:] == [tok.eot_token] for _, r in sampled_rows]
        result[f"pass@{samples}"], result[f"pass@{samples}_args"] = pass_at_k(eval_set.prompts, sampled, samples,
                                                                              sampled_ended)
        if ref_model is model:  # the policy before any update is its own reference: KL 0, nothing to estimate
            result["kl"] = 0.0
        elif ref_model is not None:
            # log pi(y|x) as generation computed it (temperature 1: the policy itself), log pi_ref(y|x) by a forward
            kl = torch.tensor(logprobs) - sequence_logprobs(ref_model, sampled_rows, device, autocast,
                                                            samples=samples).cpu()
            result["kl"] = kl.mean().item()
    model.train(was_training)
    return result, completions


# the measures as the stages print and tabulate them: (label, key)
MEASURES = [("solved, functions with arguments", "solved_args"), ("solved, all prompts", "solved"),
            ("parses", "parses"), ("reads an argument", "reads_args"), ("template share", "template"),
            ("trivial", "trivial"), ("similarity to real body (chrF)", "chrf"), ("distinct bodies / prompts", "distinct"),
            ("mean response tokens", "mean_length")]
# the measures the stages plot over training
CURVES = [("solved, functions with arguments", "solved_args"), ("solved, all", "solved"), ("parses", "parses"),
          ("template share", "template")]


def describe(m):
    """One line of the headline measures."""
    line = (f"solved {m['solved_args']:.3f} with arguments ({m['n_args']}), {m['solved']:.3f} all ({m['n_prompts']}); "
            f"parses {m['parses']:.3f}, reads args {m['reads_args']:.3f}, template {m['template']:.3f}, "
            f"chrF {m['chrf']:.3f}, distinct {m['distinct']:.2f}")
    passes = [k for k in m if k.startswith("pass@") and not k.endswith("_args")]
    for k in passes:
        line += f", {k} {m[k]:.3f} ({m[k + '_args']:.3f} with arguments)"
    if "kl" in m:
        line += f", KL {m['kl']:.3f} nats"
    return line
