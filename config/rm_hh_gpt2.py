# The HH-RLHF recipe, step 2: a reward model on Anthropic's preference pairs, from the SFT model of step 1.
# Per-kind accuracy is per subset (harmless-base, helpful-base, helpful-online, helpful-rejection-sampled).
# python train_rm.py config/rm_hh_gpt2.py      (after config/sft_hh_gpt2.py)
out_dir = "out/rm_hh_gpt2"
init_from = "out/sft_hh_gpt2"
train_file = "data/hh_rlhf/pref_train.jsonl"
val_file = "data/hh_rlhf/pref_val.jsonl"  # 8,552 test pairs
batch_size = 32  # pairs: 64 rows per forward pass
eval_batch_size = 64
max_iters = 5000  # one epoch of the ~160,000 pairs
eval_interval = 500
log_interval = 20
learning_rate = 1e-5
head_lr_mult = 50.0
min_lr = 1e-6
warmup_iters = 100
dropout = 0.0
compile = True
device = "auto"
dtype = "auto"
