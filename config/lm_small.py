# Pretrain a small GPT on the Python standard library, in the BPE of 2,048 tokens prepare.py learns from it:
# about 6 minutes on a 2-core CPU with bfloat16 (dtype 'auto' on CPUs that compute it natively), 9 in float32.
# python data/pycode/prepare.py && python train_lm.py config/lm_small.py
out_dir = "out/lm_small"
dataset = "pycode"
n_layer = 4
n_head = 4
n_embd = 192
block_size = 256
dropout = 0.0
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1000  # 1,000 steps x 4,096 tokens = 4.1M tokens, about 1.2 epochs of the 3.3M training tokens
eval_interval = 250
eval_iters = 10
log_interval = 25
learning_rate = 2e-3  # small models tolerate (and need) a larger step
min_lr = 2e-4
warmup_iters = 50
device = "cpu"
