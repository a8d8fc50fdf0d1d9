"""
Plumbing shared by every stage, written once: configuration, device and precision, distributed set-up,
checkpoints, token data, metrics and plots. Nothing here is part of the algorithms the stages teach.

Configuration works like nanoGPT's: each script declares its settings as a dataclass of plain values with a
comment each; a config file (Python) overrides some; `--key=value` on the command line overrides again.

    python train_lm.py config/lm_small.py --max_iters=100 --out_dir=out/try
    python train_lm.py --help          # every key, its default and its meaning
"""
import argparse
import ast
import contextlib
import ctypes
import dataclasses
import difflib
import inspect
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import typing
from dataclasses import dataclass

import numpy as np
import torch

from model import GPT, GPTConfig, config_from_dict
from tokenizer import TOKENIZERS


class UserError(SystemExit):
    """A problem with the user's input: printed as one line ('error: ...') and exit status 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the prepare scripts, whose bad options are one line ('error: ...') like every other script's,
    not a usage dump."""

    def error(self, message):
        raise UserError(message)


# ----------------------------------------------------------------------------------------------------------
# configuration

def field(default, *, min=None, max=None, above=None, below=None):
    """A config key's default and the values it may take, declared next to it and checked by load_config for
    every stage:  `batch_size: int = field(16, min=1)  # sequences per step`.
    min and max are inclusive bounds, above and below exclusive ones."""
    bounds = {k: v for k, v in (("min", min), ("above", above), ("max", max), ("below", below)) if v is not None}
    return dataclasses.field(default=default, metadata={"range": bounds})


@dataclass
class RunConfig:
    """The keys every stage shares, so that moving between stages needs no relearning."""
    out_dir: str = "out"  # where ckpt.pt, metrics.jsonl and the plots are written
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir's ckpt.pt), a GPT-2 name ('gpt2', ...) or another stage's out_dir
    max_iters: int = field(1000, min=0)  # optimizer steps in total
    eval_interval: int = field(100, min=1)  # evaluate (and save a checkpoint) every this many steps
    log_interval: int = field(10, min=1)  # print a progress line every this many steps
    seed: int = field(1337, min=0, max=10**9)  # seeds every random choice: runs with the same seed on a CPU are identical
    device: typing.Literal["auto", "cpu", "cuda"] = "auto"  # 'auto' picks cuda when there is one; or 'cuda:1'
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # 'auto': bf16 (or fp16) on a GPU; on a CPU bf16 where it computes it natively, else float32
    compile: bool = False  # torch.compile the model: faster on a GPU after a slow first step


def _field_comments(cls):
    """The trailing '# ...' comment of each field in the class bodies of cls and its bases: the --help text."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^=]+=.*?\s#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    return comments


def _check_type(cls, key, value, source):
    """The value, converted where that is lossless (an int for a float key), or a UserError naming the key."""
    ftype = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    if typing.get_origin(ftype) is typing.Literal:
        choices = typing.get_args(ftype)
        # 'device' also takes 'cuda:N'
        if value in choices or (key == "device" and isinstance(value, str) and re.fullmatch(r"cuda:\d+", value)):
            return value
        raise UserError(f"{source}: {key}={value!r} is not one of {', '.join(map(repr, choices))}")
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not ftype:
        raise UserError(f"{source}: {key} must be {ftype.__name__}, got {type(value).__name__} {value!r}")
    return value


RANGE_WORDS = {"min": ("at least", lambda v, b: v >= b), "max": ("at most", lambda v, b: v <= b),
               "above": ("above", lambda v, b: v > b), "below": ("below", lambda v, b: v < b)}


def describe_range(bounds):
    """'at least 0 and below 1' for {'min': 0, 'below': 1}."""
    return " and ".join(f"{RANGE_WORDS[k][0]} {v}" for k, v in bounds.items())


def declared_range(cls, key):
    """The bounds declared with key (field(..., min=...)), where the class or a base class declares them: a stage
    that only changes a shared key's default keeps its range."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            f = {f.name: f for f in dataclasses.fields(klass)}.get(key)
            if f is not None and f.metadata.get("range"):
                return f.metadata["range"]
    return {}


def _check_range(cls, key, value, source):
    """A UserError unless value lies in key's declared range; a float must be finite, a string not empty."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{source}: {key}={value!r} must be a finite number")
    if value == "":
        raise UserError(f"{source}: {key} is empty; give it a value")
    bounds = declared_range(cls, key)
    if not all(RANGE_WORDS[k][1](value, b) for k, b in bounds.items()):
        raise UserError(f"{source}: {key}={value!r} must be {describe_range(bounds)}")


def _unknown_key(cls, key, source):
    keys = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UserError(f"{source}: unknown config key {key!r}; {hint}valid keys: {', '.join(keys)}")


def config_help(cls, script):
    comments = _field_comments(cls)
    lines = [f"usage: python {script} [config/file.py] [--key=value ...]", "", "keys (default, meaning):"]
    for f in dataclasses.fields(cls):
        default = repr(f.default)
        choices = typing.get_args(f.type) if typing.get_origin(f.type) is typing.Literal else None
        meaning = comments.get(f.name, "")
        if choices:
            meaning += f" [{' | '.join(choices)}]"
        if declared_range(cls, f.name):
            meaning += f" [{describe_range(declared_range(cls, f.name))}]"
        lines.append(f"  --{f.name}={default}".ljust(40) + " " + meaning)
    return "\n".join(lines)


def _run_config_file(path):
    """The top-level names of a config file (plain Python); a file that does not run is a one-line error."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found")
    namespace = {}
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # a NameError, an import that fails...: the file's line that raised it
        line = [t.lineno for t in traceback.extract_tb(e.__traceback__) if t.filename == path][-1:] or ["?"]
        raise UserError(f"{path}:{line[0]}: {type(e).__name__}: {e}") from None
    return namespace


def load_config(cls, argv=None):
    """Defaults from cls, then each config file named in argv, then each --key=value, in order. Every value is
    checked against its key's type and declared range."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(config_help(cls, os.path.basename(sys.argv[0])))
        raise SystemExit(0)
    values, sources = {}, {}
    keys = {f.name for f in dataclasses.fields(cls)}
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: plain Python whose top-level names are config keys
            for key, value in _run_config_file(arg).items():
                if key.startswith("_") or inspect.ismodule(value) or callable(value):
                    continue
                if key not in keys:
                    raise _unknown_key(cls, key, arg)
                values[key], sources[key] = _check_type(cls, key, value, arg), arg
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise UserError(f"argument {arg!r} must look like --key=value")
            if key not in keys:
                raise _unknown_key(cls, key, "command line")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # an unquoted string, e.g. --out_dir=out/run2
            if {f.name: f.type for f in dataclasses.fields(cls)}[key] is str and not isinstance(value, str):
                value = text  # a string key takes the text as written, e.g. --start=123
            values[key], sources[key] = _check_type(cls, key, value, "command line"), "command line"
    cfg = cls(**values)
    for f in dataclasses.fields(cls):
        _check_range(cls, f.name, getattr(cfg, f.name), sources.get(f.name, "default"))
    return cfg


def print_config(cfg):
    width = max(len(k) for k in dataclasses.asdict(cfg))
    print("config:")
    for key, value in dataclasses.asdict(cfg).items():
        print(f"  {key.ljust(width)} = {value!r}")


# ----------------------------------------------------------------------------------------------------------
# device, precision, several processes

@dataclass
class Runtime:
    device: str  # 'cpu', 'cuda', 'cuda:1', ...
    device_type: str  # 'cpu' or 'cuda', what torch.autocast wants
    dtype: str  # the resolved precision: 'float32', 'bfloat16' or 'float16'
    autocast: typing.Any  # a context manager: mixed precision for the forward pass, or nothing
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self):
        return self.rank == 0  # the one process that prints, evaluates and writes files


def reuse_freed_memory():
    """Keep freed memory in the process for the next step's tensors instead of returning it to the kernel.

    By default glibc's malloc gives a freed block of a few MB back to the OS, and the next step's tensor of the
    same size is page-faulted in and zero-filled again: on a CPU that was a third of a transformer's forward pass.
    Blocks above 32 MB (a vocabulary-sized gradient) are always mapped afresh unless mmap is switched off, so it
    is: every block then comes from the heap, which is only trimmed when more than 1 GB at its top is free.
    Tensors of 2 MB or more also go on 2 MB pages (PyTorch aligns them and asks the kernel): a 77 MB output
    layer then needs 40 TLB entries instead of 19,000, and blocks of whole 2 MB pages are reused reliably.
    Measured at GPT-2's vocabulary: a 96 MB tensor made again takes 6 ms instead of 40 ms."""
    if not sys.platform.startswith("linux"):
        return
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # PyTorch reads it once: call this before making tensors
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): leave it alone
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def cpu_flags():
    """The CPU's feature flags (avx2, avx512f, avx512_bf16, ...) from /proc/cpuinfo; none where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no cheap way to tell
        return []


def machine():
    """The CPU (model name and the features that decide speed and numerics), cores, OS, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    return (f"{cpu} ({flags or 'features unknown'}), {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def cpu_has_native_bf16(flags=None):
    """Does this CPU have bfloat16 matrix instructions (AVX512-BF16 or AMX)? Without them bf16 is emulated and many
    times slower than float32; with them it can be faster (an AMD EPYC here: 2.6x), but not always (below)."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


BF16_MIN_SPEEDUP = 1.2  # dtype 'auto' takes bf16 on a CPU only where its matmuls beat float32's by this much


def cpu_bf16_speedup(n=1024, reps=2, rounds=3):
    """A bfloat16 matmul's FLOP/s over float32's on this CPU, measured (a few tenths of a second). The flags alone do
    not decide it: one Intel Xeon here with AVX512-BF16 ran bf16 at half float32's speed (143 against 269 GFLOP/s).
    The dtypes are timed in alternating rounds and each keeps its fastest product: other work on the machine slows
    some products, never speeds one up (one timing of each, back to back, once read 1.1x on a CPU that does 2.2x)."""
    best = {"bfloat16": 0.0, "float32": 0.0}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = max(best[dtype], measure_matmul_flops("cpu", n, reps, dtype))
    return best["bfloat16"] / best["float32"]


def auto_cpu_dtype(agree=None):
    """dtype 'auto' on a CPU: ('bfloat16', why) where the CPU has bf16 instructions and its bf16 matmuls run at least
    BF16_MIN_SPEEDUP times float32's, else ('float32', why). agree(speedup) -> speedup: under torchrun, the processes'
    common figure (the slowest), so that every process takes the same dtype."""
    if not cpu_has_native_bf16():
        return "float32", "no native bfloat16 on this CPU"
    speedup = cpu_bf16_speedup()
    speedup = agree(speedup) if agree else speedup
    if speedup < BF16_MIN_SPEEDUP:
        return "float32", (f"this CPU has bfloat16 instructions, but its bf16 matmuls run at {speedup:.2f}x "
                           f"float32's speed")
    return "bfloat16", f"this CPU computes bfloat16 natively, its matmuls at {speedup:.1f}x float32's speed"


def slowest_over_processes(value):
    """The smallest of every process's value (itself when there is one process)."""
    if not distributed():
        return value
    t = torch.tensor([float(value)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t.item()


def setup_runtime(cfg):
    """Pick the device and precision; under torchrun, join the process group (NCCL on GPUs, gloo on CPUs)."""
    reuse_freed_memory()
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but this machine has no CUDA GPU; use --device=cpu")
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not torch.distributed.is_initialized():  # several stages may run in one process (the tests do)
            torch.distributed.init_process_group(backend=backend)
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        # bfloat16 needs no loss scaling; older GPUs without it get float16 + GradScaler. On a CPU, bf16 only where
        # the CPU computes it natively and, measured, faster than float32.
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype, why = auto_cpu_dtype(agree=slowest_over_processes)
            if rank == 0:
                print(f"dtype 'auto': {dtype} ({why}; --dtype=float32 or bfloat16 to choose)")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = (contextlib.nullcontext() if dtype == "float32"
                else torch.autocast(device_type=device_type, dtype=ptdtype))
    return Runtime(device, device_type, dtype, autocast, ddp, rank, local_rank, world_size)


def start_stage(config_class, argv, script, stage=None):
    """The start of a stage: its config (files, then --key=value), the device, a writable out_dir (make_out_dir:
    stage is the name this stage's checkpoints carry), the config printed, every RNG seeded. Returns (cfg, runtime).

    Under torchrun every process runs the whole stage on its share of the data (see "several processes" below);
    the first one alone checks out_dir and prints, and the stages let it alone write files. Each process seeds its
    RNGs with seed + rank, so that dropout differs between them; the first one's equal a one-process run's."""
    cfg = load_config(config_class, argv)
    rt = setup_runtime(cfg)
    if rt.is_master:
        make_out_dir(cfg.out_dir, cfg.init_from, stage)
        print_config(cfg)
    elif sys.stdout is sys.__stdout__:  # the other processes print nothing: one log, not world_size copies of it
        sys.stdout = open(os.devnull, "w")
    if rt.ddp:  # the others wait until the first has checked out_dir (and, where stages run one after another in the
        torch.distributed.barrier()  # same processes, written the files of the last one: a checkpoint to resume)
    seed_everything(cfg.seed + rt.rank)
    return cfg, rt


# ----------------------------------------------------------------------------------------------------------
# several processes (torchrun): data parallelism in a few collective operations
#
# Under `torchrun --nproc_per_node=N` N copies of a stage run at once, one per GPU (or CPU process), each holding the
# whole model. At every step each takes its share of the batch (shard), computes gradients on it, and the gradients
# are averaged over the processes (average_gradients), so that every process takes the same optimizer step: the
# step one process would take on the whole batch. What must be a statistic of the whole batch (a mean over tokens,
# the mean and spread of advantages, a held-out measure) is summed (all_reduce_sum) or gathered (unshard) across
# processes. In one process every function here hands its input back untouched.

def distributed():
    """Whether this process is one of several (torchrun started it and its process group is set up)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shard(items):
    """This process's share of a list (or range): items rank, rank + N, rank + 2N, ... of N processes."""
    if not distributed():
        return items
    return items[torch.distributed.get_rank()::torch.distributed.get_world_size()]


def micro_batch(items, micro, accumulation):
    """This process's share of the micro-th of `accumulation` micro-batches of a batch (items micro, micro + A, ...).
    So one process accumulating A micro-batches computes on exactly the rows that A processes take one each (shard),
    and the summed gradients agree to the last bit."""
    return shard(items[micro::accumulation])


def gather_objects(obj):
    """[every process's obj], in rank order, on every process (any picklable object)."""
    if not distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def unshard(part):
    """Every process's shard(items) put back together in the order of items, on every process."""
    if not distributed():
        return part
    parts = gather_objects(list(part))
    whole = [None] * sum(len(p) for p in parts)
    for rank, p in enumerate(parts):
        whole[rank::len(parts)] = p
    return whole


def all_reduce_sum(x):
    """x, a tensor or a number, summed over the processes (a number comes back as a float)."""
    if not distributed():
        return x
    # NCCL reduces GPU tensors only; gloo, CPU tensors
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = x.detach().to(device, copy=True) if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64,
                                                                                  device=device)
    torch.distributed.all_reduce(t)
    return t.to(x.device) if torch.is_tensor(x) else t.item()


def all_reduce_mean(x):
    """x averaged over the processes: with shares of equal size, a mean over the shares is a mean over the whole."""
    if not distributed():
        return x
    return all_reduce_sum(x) / torch.distributed.get_world_size()


def mean_over_processes(record):
    """A log record with each of its float values averaged over the processes (ints, such as 'iter', kept)."""
    if not distributed():
        return record
    keys = [k for k, v in record.items() if isinstance(v, float)]
    means = all_reduce_mean(torch.tensor([record[k] for k in keys], dtype=torch.float64)).tolist()
    return {**record, **dict(zip(keys, means))}


def average_gradients(parameters):
    """Each gradient replaced by its mean over the processes, so that all of them take the same optimizer step.

    This is what DistributedDataParallel does during the backward pass (train_lm.py uses it), overlapping the
    communication with the computation. But DDP only sees what runs through the model's forward(), and the later
    stages reach the model through its hidden states, its scalar head, its token log-probs and generate(); so they
    average here, after backward: the same numbers, one all-reduce per parameter. A parameter without a gradient
    gets zeros, so that every process reduces the same tensors in the same order."""
    if not distributed():
        return
    world = torch.distributed.get_world_size()
    for p in parameters:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def same_weights_everywhere(*models):
    """Every process's weights made the first process's: a freshly initialised scalar head (the reward model's, PPO's
    value head) would otherwise start differently in each process, as each seeds its RNG differently."""
    if not distributed():
        return
    for model in models:
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, src=0)


def grad_scaler(runtime):
    """float16 gradients underflow without scaling the loss up first; bf16 and fp32 need no scaler."""
    return torch.amp.GradScaler(runtime.device_type, enabled=runtime.dtype == "float16")


def optimizer_step(optimizer, scaler, parameters, grad_clip):
    """Unscale (fp16) gradients, clip their global norm, step (the scaler skips a step with inf/nan gradients),
    and clear the gradients for the next step. Returns the gradient norm before clipping, for NonFiniteGuard."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class NonFiniteGuard:
    """Stops a run at the first step whose loss or gradient norm is nan or inf, with an error naming that step,
    before weights it reached are evaluated or saved (save_checkpoint refuses them too).

    record() keeps the first bad step on the device, so the GPU is not waited for at every step; check() reads
    it back, and the loops call it at every log line and before every evaluation and checkpoint. With float16
    an infinite gradient now and then is expected: the loss scaler skips that step and lowers its scale, so
    there only the loss is watched."""

    def __init__(self, learning_rate, scaler=None, device="cpu"):
        self.learning_rate = learning_rate
        self.float16 = scaler is not None and scaler.is_enabled()
        self.first_bad_step = torch.tensor(-1, device=device)  # -1 while every step was finite

    def record(self, step, loss, grad_norm=None):
        bad = ~torch.isfinite(loss.detach()).all()
        if grad_norm is not None and not self.float16:
            bad = bad | ~torch.isfinite(grad_norm)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def check(self):
        step = int(self.first_bad_step)
        if step >= 0:
            cause = f"learning_rate={self.learning_rate:g} is most likely too high for this model: lower it"
            if self.float16:
                cause += ", or use dtype='bfloat16' or 'float32' (float16 overflows above 65504)"
            raise UserError(f"the loss or its gradient became nan or inf at step {step}; {cause}. Nothing after "
                            f"the last checkpoint was saved")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def measure_matmul_flops(device="cpu", n=1024, reps=5, dtype="float32"):
    """Matmul FLOP/s on this device in the dtype in use, the fastest of reps products: the peak an MFU figure is
    measured against."""
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    a @ b  # warm-up
    fastest = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        fastest = min(fastest, time.perf_counter() - t0)
    return 2 * n ** 3 / fastest


# Datasheet peaks of dense bfloat16/float16 matrix products on tensor cores (FP32 accumulation), in TFLOP/s: the
# denominator MFU is usually taken against (nanoGPT: the A100's 312). Matched in order against the GPU's name.
GPU_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
                   ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2), ("V100", 125.0)]


def datasheet_peak_flops(device, dtype):
    """This GPU's datasheet peak in FLOP/s for bf16/fp16, or None: a CPU, float32, or a GPU not in the table."""
    if not device.startswith("cuda") or dtype not in ("bfloat16", "float16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in GPU_PEAK_TFLOPS if key in name), None)


def mfu_peak(peak_tflops, runtime):
    """(FLOP/s, where the number comes from) for MFU: peak_tflops when it is set; else the GPU's datasheet peak;
    else the matrix products of this device measured here, in the run's dtype."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "set by peak_tflops"
    datasheet = datasheet_peak_flops(runtime.device, runtime.dtype)
    if datasheet:
        return datasheet, f"the datasheet's {runtime.dtype} peak of the {torch.cuda.get_device_name(runtime.device)}"
    return measure_matmul_flops(runtime.device, dtype=runtime.dtype), (f"{runtime.dtype} matmul measured here; set "
                                                                         f"peak_tflops to change")


def evaluation_due(step, eval_interval, eval_at_start):
    """An RL stage evaluates every eval_interval steps (and at its end), step 0 (the SFT model it starts from) only
    with eval_at_start: pipeline.py evaluates that model in one seed of a stage, not again in every seed."""
    return step % eval_interval == 0 and (step > 0 or eval_at_start)


def cosine_lr(it, learning_rate, warmup_iters, decay_iters, min_lr):
    """Linear warm-up, then cosine decay to min_lr at decay_iters, then min_lr (as nanoGPT)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, so the checkpoint it then writes
    is exact. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for s in self._old:
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            for s, h in self._old.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, checkpoint):
    """Write atomically (write_atomic): a crash or kill at any moment leaves the old checkpoint or the new one.
    Weights that are nan or inf are never written over it."""
    for part in ("model", "critic"):
        bad = [k for k, v in (checkpoint.get(part) or {}).items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise UserError(f"not saving {path}: the {part}'s weights {', '.join(bad[:3])} are nan or inf (the "
                            f"training diverged; lower learning_rate); the checkpoint there is left as it was")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, hint=None):
    """Load with weights_only=True: tensors and plain containers only, so an untrusted file cannot run code."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}" + (f"; {hint}" if hint else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated zip, wrong format, pickled code...
        detail = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"{path} is not a readable checkpoint (corrupt, truncated or empty?): "
                        f"{type(e).__name__}" + (f": {detail}" if detail else "")) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint of this project (it holds a {type(ckpt).__name__})")
    missing = [k for k in ("model_args", "model", "tokenizer") if k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)})")
    return ckpt


def resume_checkpoint(out_dir, stage, what, start="init_from=<an SFT out_dir>"):
    """out_dir/ckpt.pt of an earlier run of this stage, for init_from='resume'; returns (path, checkpoint).
    A checkpoint another stage wrote there is an error that says so: what names this stage's runs ('DPO run');
    start says how such a run starts."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, hint=f"init_from='resume' continues a run in out_dir; start one with {start} first")
    if ckpt.get("stage") != stage:
        raise UserError(f"{path} is a {ckpt.get('stage')!r} checkpoint, not a {what}'s; use another out_dir")
    return path, ckpt


def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_from_checkpoint(ckpt, path="checkpoint", dropout=None, scalar_head=None):
    """Build the GPT a checkpoint describes and load its weights; optionally change dropout or add/drop the
    scalar head (a fresh head when the checkpoint has none, e.g. a reward model built from an SFT model)."""
    args = dict(ckpt["model_args"])
    if dropout is not None:
        args["dropout"] = dropout
    if scalar_head is not None:
        args["scalar_head"] = scalar_head
    model = GPT(config_from_dict(args))
    state = clean_state_dict(ckpt["model"])
    if not args["scalar_head"]:
        state = {k: v for k, v in state.items() if not k.startswith("scalar_head")}
    strict = ckpt["model_args"].get("scalar_head", False) or not args["scalar_head"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model it describes: {str(e).splitlines()[1].strip()}") from None
    missing = [k for k in missing if strict or not k.startswith("scalar_head")]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def gpt2_weights(name_or_dir, **kwargs):
    """GPT.from_pretrained, with a download that fails or a directory that is not GPT-2's as a one-line error."""
    try:
        return GPT.from_pretrained(name_or_dir, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot load GPT-2 weights from {name_or_dir!r}: {e}") from None


def check_model_args(ckpt_args, wanted, path):
    """Resuming with a config that describes another model is an error, not a silent override."""
    for key, value in wanted.items():
        if key in ckpt_args and key != "dropout" and ckpt_args[key] != value:
            raise UserError(f"{path} has {key}={ckpt_args[key]!r} but the config asks for {key}={value!r}; "
                            f"change the config or use a new out_dir")


def rng_state(data_generator=None):
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def set_rng_state(state, data_generator=None):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])


def init_model(init_from, out_dir, model_args, tokenizer_name, stage_hint, stage=None, what=None,
               start="init_from='scratch'"):
    """The model a stage starts from. Returns (model, checkpoint or None, tokenizer name).

    init_from: 'scratch', a new GPT from model_args; 'resume', out_dir/ckpt.pt with its optimizer and RNG
    state, which must be a checkpoint of this stage (stage, what and start as for resume_checkpoint); a GPT-2
    name or a local Hugging Face directory, GPT-2 weights; another stage's out_dir, its weights.
    """
    src = init_from
    if src == "scratch":
        if model_args["n_embd"] % model_args["n_head"]:
            raise UserError(f"n_embd={model_args['n_embd']} must be a multiple of n_head={model_args['n_head']}: "
                            f"each head gets n_embd / n_head dimensions")
        return GPT(GPTConfig(**model_args)), None, tokenizer_name
    if src == "resume":
        path, ckpt = resume_checkpoint(out_dir, stage, what, start)
        check_model_args(ckpt["model_args"], {k: v for k, v in model_args.items() if k != "block_size"}, path)
        return model_from_checkpoint(ckpt, path, dropout=model_args.get("dropout")), ckpt, ckpt["tokenizer"]
    if os.path.isfile(os.path.join(src, "config.json")) or (src.startswith("gpt2") and not os.path.isdir(src)):
        model = gpt2_weights(src, dropout=model_args.get("dropout", 0.0))
        if model_args.get("block_size", model.config.block_size) < model.config.block_size:
            model.crop_block_size(model_args["block_size"])
        return model, None, "gpt2"
    path = os.path.join(src, "ckpt.pt")
    ckpt = load_checkpoint(path, hint=stage_hint)
    return model_from_checkpoint(ckpt, path, dropout=model_args.get("dropout")), None, ckpt["tokenizer"]


# ----------------------------------------------------------------------------------------------------------
# token data: nanoGPT's flat uint16 arrays

def dataset_dir(dataset):
    """A dataset name is a folder under data/ of this repository ('pycode', 'pycode/gpt2'); a path works too."""
    if os.path.isdir(dataset) and os.path.sep in os.path.normpath(dataset):
        return dataset
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)


def prepare_hint(data_dir):
    """The command that makes a dataset folder: its own prepare.py, or its parent's with that tokenizer, or, for a
    folder of neither, a prepare script writing into it."""
    if os.path.exists(os.path.join(data_dir, "prepare.py")):
        return f"run `python {os.path.relpath(os.path.join(data_dir, 'prepare.py'))}` first"
    if not os.path.exists(os.path.join(os.path.dirname(data_dir), "prepare.py")):
        return f"make it with a prepare script, e.g. `python data/pycode/prepare.py --out_dir={data_dir}`"
    parent = os.path.relpath(os.path.join(os.path.dirname(data_dir), "prepare.py"))
    return f"run `python {parent} --tokenizer={os.path.basename(data_dir)}` first"


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found; {prepare_hint(data_dir)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:  # not JSON, not UTF-8, not a file
        raise UserError(f"{path} is not readable JSON ({e}); make the dataset again: "
                        f"{prepare_hint(data_dir)}") from None
    missing = [k for k in ("tokenizer", "n_vocab") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; make the dataset again: {prepare_hint(data_dir)}")
    spec = meta["tokenizer"]
    known = spec.get("kind") == "bpe" and "tokens" in spec if isinstance(spec, dict) else spec in TOKENIZERS
    if not known:
        raise UserError(f"{path} names an unknown tokenizer {spec!r}; make the dataset again: "
                        f"{prepare_hint(data_dir)}")
    return meta


class TokenBatches:
    """Random windows of block_size + 1 tokens from train.bin or val.bin: x is the window, y the window
    shifted by one (the next token at every position). tokenizer: the one the data must have been made with."""

    def __init__(self, data_dir, split, block_size, batch_size, device, tokenizer=None):
        self.path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.exists(self.path):
            raise UserError(f"{self.path} not found; {prepare_hint(data_dir)}")
        meta = read_meta(data_dir)
        if tokenizer is not None and meta["tokenizer"] != tokenizer:
            raise UserError(f"{data_dir} was made with the tokenizer {meta['tokenizer']!r}, not the model's "
                            f"{tokenizer!r}; use data made with the model's tokenizer")
        if os.path.getsize(self.path) % 2:
            raise UserError(f"{self.path} has an odd number of bytes, so it is not uint16 token ids; make the "
                            f"dataset again: {prepare_hint(data_dir)}")
        self.n_tokens = os.path.getsize(self.path) // 2
        if self.n_tokens <= block_size + 1:
            raise UserError(f"{self.path} has {self.n_tokens} tokens, fewer than one block of {block_size + 1}")
        largest = int(np.memmap(self.path, dtype=np.uint16, mode="r")[:10_000_000].max())  # a quick look
        if largest >= meta["n_vocab"]:
            raise UserError(f"{self.path} holds token id {largest}, but meta.json's tokenizer has {meta['n_vocab']} "
                            f"tokens; make the dataset again: {prepare_hint(data_dir)}")
        self.block_size, self.batch_size, self.device = block_size, batch_size, device

    def get(self, generator):
        # a fresh memmap per batch: numpy's memmap otherwise keeps growing resident memory (nanoGPT's note)
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        starts = torch.randint(self.n_tokens - self.block_size - 1, (self.batch_size,), generator=generator)
        windows = np.stack([data[s:s + self.block_size + 1] for s in starts.tolist()]).astype(np.int64)
        xy = torch.from_numpy(windows)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


# ----------------------------------------------------------------------------------------------------------
# metrics and plots

class Metrics:
    """One JSON object per line in out_dir/metrics.jsonl. On resume from step N the records of steps after N
    are dropped: the checkpoint knows nothing of them, and the resumed run writes them again. The file is
    rewritten atomically, so a kill meanwhile leaves every record it had."""

    def __init__(self, out_dir, resume_iter=None, enabled=True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        kept = []
        if resume_iter is not None and os.path.exists(self.path):
            kept = [r for r in read_jsonl_records(self.path) if r.get("iter", 0) <= resume_iter]
        write_jsonl(self.path, kept)

    def log(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl_records(path):
    """The records of a metrics file. A last line cut short (a run killed while appending it) is left out."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):  # a complete line (a newline follows it) that is not JSON: the file is damaged
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return records


def plot_curves(path, panels, title, xlabels=None, vlines=None):
    """panels: {panel title: {series name: (xs, ys)}} -> one PNG with a panel per entry, side by side. The x axis is
    the iteration unless xlabels names another for a panel; vlines: {panel title: x} draws a dashed line there."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
        if (vlines or {}).get(panel):
            ax.axvline(vlines[panel], color="grey", linestyle="--", linewidth=1)
        ax.set_title(panel)
        ax.set_xlabel((xlabels or {}).get(panel, "iteration"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def write_atomic(path, write):
    """Write through a temp file in the same directory, flushed to disk, then renamed over the old one: a crash or
    kill at any moment leaves the old file or the new one, never half of one (a kill leaves the temp file too,
    which make_out_dir removes at the next start). write(f) fills a binary file. A file system that refuses
    (read-only, full) is a UserError; the old file is left as it was."""
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".",
                                   suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def checkpoint_stage(path):
    """The stage that wrote a checkpoint, read without loading its tensors (None if it cannot be read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("stage")
    except Exception:  # corrupt or not ours: nothing worth keeping from another stage
        return None


def is_temp_file(name):
    """Whether a file name is one of write_atomic's temp files: '<name>.<8 random characters>.tmp'."""
    return re.fullmatch(r".+\.[a-z0-9_]{8}\.tmp", name) is not None


def make_out_dir(out_dir, init_from=None, stage=None):
    """Create out_dir if needed and check that files can be written there, before any work is done; remove the
    temp files of writes a kill cut short (a checkpoint or metrics file they were to replace is intact).
    A new run may not write over the checkpoint it starts from (init_from) or another stage's checkpoint."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} is a file, not a directory; choose another out_dir")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if stage is not None and init_from != "resume" and os.path.isfile(ckpt_path):
        if os.path.exists(init_from) and os.path.samefile(init_from, out_dir):
            raise UserError(f"out_dir and init_from are both {out_dir!r}: the run would write over the checkpoint it "
                            f"starts from; choose another out_dir (or init_from='resume' to continue it)")
        found = checkpoint_stage(ckpt_path)
        if found not in (None, stage):
            raise UserError(f"{ckpt_path} is a {found!r} checkpoint that this {stage!r} run would write over; "
                            f"choose another out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write_probe.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir!r}: {e.strerror}; choose another out_dir") from None
    stale = [name for name in os.listdir(out_dir) if is_temp_file(name)]
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    if stale:
        print(f"removed {len(stale)} temp file(s) an interrupted write left in {out_dir}: {', '.join(stale)}")


def write_jsonl(path, rows):
    """One JSON object per line, UTF-8, written atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def download(url, path, instead):
    """url saved to path with the standard library (a data set's prepare.py calls it when the file is not there yet),
    written atomically: an interrupted download leaves nothing behind. Offline, or on any failure, a UserError that
    says what to do instead (instead: e.g. 'run it with --from_file=<a copy of aclImdb_v1.tar.gz>')."""
    import urllib.error
    import urllib.request
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} to {path} ...", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            content = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {url} ({reason}); {instead}") from None
    write_atomic(path, lambda f: f.write(content))


def before_after_table(before, after, rows, stage):
    """The measures [(label, key)] of the SFT model (before) and of the model a stage trained from it (after), as
    a fixed-width table; a measure the before results lack (the RM score when there is no RM) is left out. Empty
    before results (a run that did not evaluate its starting model, eval_at_start=False) show as '-'."""
    lines = [f"{'':36}{'SFT (before)':>14}{f'{stage} (after)':>14}"]
    for label, key in rows:
        if key in after and (key in before or not before):
            was = f"{before[key]:.3f}" if before else "-"
            lines.append(f"{label:36}{was:>14}{after[key]:>14.3f}")
    return "\n".join(lines)


def write_before_after(out_dir, stage, intro, table, png, before, after, prompts):
    """out_dir/report.md (the table, the curves, sample completions before and after) and before_after.json (the
    measures). before, after: {"metrics": {...}, "completions": [greedy completions of the prompts shown]}; prompts:
    those prompts, picked by the task's showcase order (tasks.shown), never by how their completions score."""
    samples = []
    for i, (prompt, a) in enumerate(zip(prompts, after["completions"])):
        b = before["completions"][i] if i < len(before["completions"]) else None  # None: not evaluated (see above)
        samples.append(f"### prompt {i + 1}\n```python\n{prompt}```\n"
                       + (f"SFT (before):\n```python\n{b}\n```\n" if b is not None else "")
                       + f"{stage} (after):\n```python\n{a}\n```\n")
    report = (f"# {stage}: {out_dir}\n\n{intro}\n\n```\n{table}\n```\n\n![curves]({png})\n\n## Samples\n\n"
              "Greedy completions of the first held-out prompts in the task's showcase order (pycode: functions that "
              "take arguments first), the same prompts before and after.\n\n" + "\n".join(samples))
    write_atomic(os.path.join(out_dir, "report.md"), lambda f: f.write(report.encode("utf-8")))
    measures = json.dumps({"before": before["metrics"], "after": after["metrics"]}, indent=1)
    write_atomic(os.path.join(out_dir, "before_after.json"), lambda f: f.write(measures.encode("utf-8")))


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ----------------------------------------------------------------------------------------------------------
# text data: JSONL files of prompts, responses and preference pairs

def read_jsonl(path):
    """[(line number, object)] from a JSON-lines file; a bad line is an error naming file:line."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found" if not os.path.exists(path) else f"{path} is not a file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: a byte-order mark some editors add
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x}); save it as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise UserError(f"{path} has no examples")
    return rows


def text_field(obj, key, where, allow_empty=False):
    value = obj.get(key)
    if not isinstance(value, str):
        raise UserError(f"{where}: missing text field {key!r} (has {', '.join(sorted(obj)) or 'no fields'})")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return value


INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def format_prompt(prompt, template):
    """'none': the prompt as it is (our code task: a def line and a docstring already ask for a body);
    'instruction': the Alpaca-style template for instruction data."""
    if template == "none":
        return prompt
    if template == "instruction":
        return INSTRUCTION_TEMPLATE.format(instruction=prompt.strip())
    raise UserError(f"unknown prompt template {template!r}; choose 'none' or 'instruction'")


def read_sft_examples(path):
    """[(prompt, response)] from any of three formats, detected per line:
    ours {"prompt", "response"}; Alpaca {"instruction", "input", "output"}; ChatLLaMA {"user_input", "completion"}.
    Several files may be given as a comma-separated list."""
    if "," in path:
        return [x for p in path.split(",") if p.strip() for x in read_sft_examples(p.strip())]
    examples = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        if "instruction" in obj:
            prompt = text_field(obj, "instruction", where)
            extra = obj.get("input") or ""
            if not isinstance(extra, str):
                raise UserError(f"{where}: field 'input' must be text")
            prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
            response = text_field(obj, "output", where)
        elif "user_input" in obj:
            prompt, response = text_field(obj, "user_input", where), text_field(obj, "completion", where)
        else:
            prompt, response = text_field(obj, "prompt", where), text_field(obj, "response", where)
        examples.append((prompt, response))
    return examples


def read_preference_pairs(path):
    """[{"prompt", "chosen", "rejected", "kind"}] from ours {"prompt", "chosen", "rejected", "kind"?} or
    Anthropic HH-RLHF's full texts {"chosen", "rejected"}, split at their last shared '\\n\\nAssistant:'."""
    pairs = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        # our format may reject an empty response (saying nothing is a real, bad answer); a chosen one must say something
        chosen = text_field(obj, "chosen", where)
        rejected = text_field(obj, "rejected", where, allow_empty="prompt" in obj)
        if "prompt" in obj:
            prompt = text_field(obj, "prompt", where)
        else:
            marker = "\n\nAssistant:"
            cut = chosen.rfind(marker)
            if cut < 0 or not rejected.startswith(chosen[:cut + len(marker)]):
                raise UserError(f"{where}: a full-text pair needs a shared prompt ending in {marker!r}")
            prompt = chosen[:cut + len(marker)]
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
            if not chosen.strip() or not rejected.strip():
                raise UserError(f"{where}: empty response after the prompt")
        kind = str(obj.get("kind", "unlabelled"))  # HH-RLHF's pairs have no kind
        if kind == "all":
            raise UserError(f"{where}: kind 'all' names the overall results; call this kind something else")
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind})
    return pairs


def read_scored_examples(path):
    """[(prompt, completion, score)] from ChatLLaMA's reward data {"user_input", "completion", "score"}."""
    examples = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        score = obj.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise UserError(f"{where}: field 'score' must be a number")
        examples.append((text_field(obj, "user_input", where), text_field(obj, "completion", where), float(score)))
    return examples


def read_prompts(path, tok, template, max_len):
    """Prompts {"prompt": ...} as raw text, with the template applied, and as token ids; prompts longer than
    max_len tokens (those that would leave too little room to answer) are dropped and counted."""
    if max_len < 1:
        raise UserError("max_new_tokens leaves no room for a prompt in the model's context; lower it below block_size")
    raw, formatted, ids, dropped = [], [], [], 0
    for n, obj in read_jsonl(path):
        prompt = text_field(obj, "prompt", f"{path}:{n}")
        text = format_prompt(prompt, template)
        encoded = tok.encode(text)
        if len(encoded) > max_len:
            dropped += 1
            continue
        raw.append(prompt)
        formatted.append(text)
        ids.append(encoded)
    if not raw:
        raise UserError(f"{path}: every prompt is longer than {max_len} tokens; lower max_new_tokens")
    return raw, formatted, ids, dropped


def encode_prompt_response(tok, prompt, response, block_size):
    """Token ids of prompt and of response + end-of-text, or None when together they exceed the context
    (such examples are dropped and counted, never cut mid-token)."""
    p, r = tok.encode(prompt), tok.encode(response) + [tok.eot_token]
    if len(p) + len(r) > block_size or not p:
        return None
    return p, r


def pad_right(seqs, pad_id):
    """(B, T) ids padded on the right and a (B, T) mask, 1 on real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def pad_left(seqs, pad_id):
    """(B, T) ids padded on the left and a (B, T) mask: generation continues every row at the same column."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids, mask


def batches_by_length(lengths, batch_size):
    """Indices 0..n-1 in batches of batch_size, in order of length: a batch then pads to about its own rows' width,
    not to the longest of all. The caller puts each batch's results back at its indices."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def batch_rows(rows, pad_id, device):
    """[(prompt ids, response ids)] -> left-padded prompts + right-padded responses, attention mask, prompt width."""
    prompts, prompt_mask = pad_left([p for p, _ in rows], pad_id)
    R = max(len(r) for _, r in rows)
    responses = torch.full((len(rows), R), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((len(rows), R), dtype=torch.long)
    for i, (_, r) in enumerate(rows):
        responses[i, :len(r)] = torch.tensor(r)
        resp_mask[i, :len(r)] = 1
    seqs = torch.cat([prompts, responses], dim=1).to(device)
    attn = torch.cat([prompt_mask, resp_mask], dim=1).to(device)
    return seqs, attn, prompts.size(1)

# ----------------------------------------------------------------------------------------------------------
# generation for evaluation (the task itself, its judge and measures, live in tasks/)

@torch.no_grad()
def complete(model, tok, prompts, max_new_tokens, batch_size=64, device="cpu", autocast=None, greedy=True,
             temperature=1.0, generator=None, samples=1, with_logprobs=False):
    """Completion texts for prompt strings, cut at end-of-text: batched, left-padded, KV-cached generation.
    Also returns each row's token ids (prompt, completion) for scoring; with_logprobs, also each completion's
    log-probability (its end-of-text token included) under the distribution it was drawn from, as generation
    computed it.

    samples = k continues every prompt k times: its k rows follow one another, as if the prompt had been listed k
    times, but it is run once and its keys and values shared by the k samples. batch_size counts rows (the
    memory a batch takes): batch_size // k prompts per generate call. Prompts are batched in order of length (a
    batch of short prompts then pads to a short width, not to the longest of all), and the results come back in
    the order of prompts.

    Under torchrun the prompts are shared out among the processes, each samples from a random stream of its own
    (drawn from generator), and every process gets all the completions back, in the order of prompts: so every
    process must call it, with the same prompts."""
    autocast = autocast or contextlib.nullcontext()
    model.eval()
    if distributed():
        prompts = shard(prompts)
        if generator is not None:
            seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
            generator = torch.Generator(device=generator.device).manual_seed(seed + torch.distributed.get_rank())
    encoded = [tok.encode(p) for p in prompts]
    results = [None] * len(prompts)  # per prompt: its k (text, (prompt ids, completion ids), log-prob)
    for batch in batches_by_length([len(e) for e in encoded], max(1, batch_size // samples)):
        ids, mask = pad_left([encoded[i] for i in batch], tok.eot_token)
        ids, mask = ids.to(device), mask.to(device)
        with autocast:
            out, logprobs = model.generate(ids, max_new_tokens, attention_mask=mask, greedy=greedy,
                                           temperature=temperature, eot_token=tok.eot_token, generator=generator,
                                           num_samples=samples, return_logprobs=True)
        rows, sums = out[:, ids.size(1):].tolist(), logprobs.float().sum(dim=1).tolist()  # 0 after end-of-text
        for j, i in enumerate(batch):
            results[i] = []
            for row, logprob in zip(rows[j * samples:(j + 1) * samples], sums[j * samples:(j + 1) * samples]):
                cut = row.index(tok.eot_token) if tok.eot_token in row else len(row)
                # the completion keeps its end-of-text token, if it has one
                results[i].append((tok.decode(row[:cut]), (encoded[i], row[:cut + 1]), logprob))
    flat = [r for per_prompt in unshard(results) for r in per_prompt]
    texts, token_rows, logprobs = [t for t, _, _ in flat], [r for _, r, _ in flat], [lp for _, _, lp in flat]
    return (texts, token_rows, logprobs) if with_logprobs else (texts, token_rows)
