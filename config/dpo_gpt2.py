# The pycode recipe at GPU scale, step 4 without RL: DPO-Positive of the SFT model on the made-up pairs.
# python train_dpo.py config/dpo_gpt2.py      (after config/sft_gpt2.py)
out_dir = "out/dpo_gpt2"
init_from = "out/sft_gpt2"
train_file = "data/pycode/gpt2/pref_train.jsonl"
val_file = "data/pycode/gpt2/pref_val.jsonl"
eval_prompts = "data/pycode/gpt2/prompts_eval.jsonl"
max_new_tokens = 256
beta = 0.1
dpop_lambda = 50.0
batch_size = 32
max_iters = 500
eval_interval = 100
learning_rate = 2e-6
min_lr = 2e-7
warmup_iters = 20
compile = True
device = "auto"
dtype = "auto"
