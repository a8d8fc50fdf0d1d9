# The HH-RLHF recipe, step 3 without RL: DPO on Anthropic's pairs from the SFT model of step 1, measured by the reward
# model of step 2 (the share of held-out dialogues where it prefers the policy's answer to the SFT model's).
# python train_dpo.py config/dpo_hh_gpt2.py      (after config/sft_hh_gpt2.py; config/rm_hh_gpt2.py for the measure)
out_dir = "out/dpo_hh_gpt2"
init_from = "out/sft_hh_gpt2"
reward_model = "out/rm_hh_gpt2"  # only measures: DPO itself needs no reward model
task = "hh_rlhf"
train_file = "data/hh_rlhf/pref_train.jsonl"
val_file = "data/hh_rlhf/pref_val.jsonl"
eval_prompts = "data/hh_rlhf/prompts_eval.jsonl"
eval_max_prompts = 128
eval_samples = 2
max_new_tokens = 128
beta = 0.1
batch_size = 32
eval_batch_size = 32
max_iters = 2500
eval_interval = 500
log_interval = 20
learning_rate = 1e-6  # DPO moves far on little: the papers' 5e-7 to 1e-6
min_lr = 1e-7
warmup_iters = 100
compile = True
device = "auto"
dtype = "auto"
