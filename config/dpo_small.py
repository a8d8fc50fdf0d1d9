# DPO on the pycode preference pairs, from the small SFT model: about 1.5 minutes on a 2-core laptop CPU.
# python train_dpo.py config/dpo_small.py        (after train_sft.py config/sft_small.py; no reward model needed)
out_dir = "out/dpo_small"
init_from = "out/sft_small"  # the policy and the frozen reference both start here
train_file = "data/pycode/pref_train.jsonl"
val_file = "data/pycode/pref_val.jsonl"  # held-out pairs: implicit accuracy per kind
batch_size = 16  # pairs: 32 rows per forward pass
max_iters = 60  # 60 x 16 = 960 pairs: the reference's log-probs are computed for these only
eval_interval = 60  # before and after: the held-out pairs + the gold measure on 220 prompts, ~20 s each
log_interval = 10
max_new_tokens = 96  # the same limit (and so the same eval prompts) as train_sft.py and train_ppo.py
# tried with 150 steps, on an earlier version of the pairs (3,756, five kinds; SFT parses 0.830): plain DPO at
# beta 0.1, lr 5e-5: 0.578 (56 completions with broken indentation, the bad_indent pairs' doing); lr 1e-5: 0.735;
# beta 0.5, lr 1e-5: 0.794. DPO-Positive at beta 0.1: lr 5e-5, lambda 10: 0.843; lambda 50: 0.848, but 0.798 at
# step 100; lr 1e-4, lambda 10: 0.825; lr 2e-5, lambda 50 (this config): 0.839, 0.843, 0.843 at steps 50, 100, 150.
# On the current pairs (3,916, six kinds; SFT 0.832): plain DPO at lr 5e-5: 0.723; this config: 0.873, 0.859, 0.859
beta = 0.1
dpop_lambda = 50.0  # Pal et al. 2024's value
learning_rate = 2e-5
min_lr = 2e-6
warmup_iters = 10
device = "cpu"
