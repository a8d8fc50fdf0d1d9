# DPO from the small SFT model on collect_pairs.py's pairs: its own samples, ranked by the task's judge. About a
# minute per run on a 2-core CPU with bfloat16; no reward model needed.
# python train_dpo.py config/dpo_small.py        (after train_sft.py and collect_pairs.py)
out_dir = "out/dpo_small"
init_from = "out/sft_small"  # the policy and the frozen reference both start here
# the SFT model's own samples: a response that solves its prompt against one of the same prompt that does not.
# prepare.py's made-up pairs (a bracket removed, one line's indent broken) differ from their chosen side by a
# token or two, and there DPO pushes both responses down, breaking the indentation of its own completions
train_file = "out/pairs_small/pref_train.jsonl"
val_file = "out/pairs_small/pref_val.jsonl"
batch_size = 16  # pairs: 32 rows per forward pass
max_iters = 120  # 120 x 16 = 1,920 pairs, a third of an epoch
lr_decay_iters = 120  # the cosine ends here whatever max_iters is: a longer run's first 120 steps are these
eval_interval = 120  # before and after
log_interval = 20
max_new_tokens = 64  # as every stage
eval_samples = 4  # pass@4 and the KL to SFT at each evaluation
beta = 0.1
dpop_lambda = 0.0  # plain DPO: these pairs differ in more than a token, and DPO-Positive's penalty held it in place
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 10
device = "cpu"
