# Supervised fine-tuning of lm_small on the pycode demonstrations (def line + docstring -> body): about 4 minutes
# on a 2-core CPU with bfloat16.
# python train_lm.py config/lm_small.py && python train_sft.py config/sft_small.py
out_dir = "out/sft_small"
init_from = "out/lm_small"
template = "none"  # the prompt (a def line and a docstring) already asks for a body
# the real functions, and copies of those whose body reads an argument with the arguments renamed (prompt and body
# alike): the copies teach that a body's names come from the def line, not from memory
train_file = "data/pycode/sft_train.jsonl,data/pycode/sft_train_renamed.jsonl"
batch_size = 16
max_iters = 600  # 600 x 16 = 9,600 examples, about 3.4 epochs of the 2,825 demonstrations
eval_interval = 600  # before and after
log_interval = 50
max_new_tokens = 64  # the same limit (and so the same held-out prompts) in every stage; real bodies need at most 65
eval_samples = 8  # pass@8 at the end
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
dropout = 0.0
device = "cpu"
