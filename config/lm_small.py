# Pretrain a small byte-level GPT on the Python standard library: about 6-7 minutes on a 2-core laptop CPU.
# python data/pycode/prepare.py && python train_lm.py config/lm_small.py
out_dir = "out/lm_small"
dataset = "pycode"  # byte tokenizer: 257 tokens, so the model's time goes into its Transformer blocks
n_layer = 4
n_head = 4
n_embd = 192
block_size = 256
dropout = 0.0
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 650  # 650 steps x 4,096 tokens = 2.7M tokens
eval_interval = 100
eval_iters = 10
log_interval = 25
learning_rate = 2e-3  # small models tolerate (and need) a larger step
min_lr = 2e-4
warmup_iters = 50
device = "cpu"
