# Reward model on the pycode preference pairs, from the small pretrained model: about 7 minutes on a 2-core CPU.
# python train_rm.py config/rm_small.py    (after train_sft.py config/sft_small.py and collect_pairs.py config/pairs_small.py)
out_dir = "out/rm_small"
init_from = "out/lm_small"  # the pretrained backbone, not SFT's: PPO does better against it (README, "The reward model")
# two sources: prepare.py's made-up corruptions of real bodies (one kind each), and the SFT model's own samples
# ranked by the task's judge (kind 'sampled'): without the second, the reward model never sees the policy's own
# mistakes, and PPO climbs its blind spots instead of the task
train_file = "data/pycode/pref_train.jsonl,out/pairs_small/pref_train.jsonl"
val_file = "data/pycode/pref_val.jsonl,out/pairs_small/pref_val.jsonl"  # held out: other files, never trained on
mismatched = True  # each prompt also against another prompt's chosen body: does the body belong to this prompt?
batch_size = 32  # pairs: 64 rows per forward pass, and 32 more with the mismatched bodies
max_iters = 400
eval_interval = 200
log_interval = 20
learning_rate = 2.5e-4
head_lr_mult = 20.0  # the fresh scalar head learns at 5e-3 while the pretrained backbone moves slowly
frozen_layers = 0
min_lr = 2e-5
warmup_iters = 10
dropout = 0.0
device = "cpu"
