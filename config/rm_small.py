# Reward model on the pycode preference pairs, from the small SFT model: about 3 minutes on a 2-core laptop CPU.
# python train_rm.py config/rm_small.py         (after train_sft.py config/sft_small.py)
out_dir = "out/rm_small"
init_from = "out/sft_small"  # any out_dir of this project works (e.g. out/lm_small): they share the layout
train_file = "data/pycode/pref_train.jsonl"  # 1,343 pairs
val_file = "data/pycode/pref_val.jsonl"  # 251 held-out pairs from other files of the standard library
batch_size = 16  # pairs: 32 rows per forward pass
max_iters = 200
eval_interval = 50
log_interval = 10
learning_rate = 2e-4  # the pretrained backbone moves slowly...
head_lr_mult = 50.0  # ...while the fresh scalar head learns at 1e-2
min_lr = 2e-5
warmup_iters = 10
dropout = 0.0
device = "cpu"
