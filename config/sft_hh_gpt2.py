# The HH-RLHF recipe, step 1: GPT-2 (124M) fine-tuned on the chosen answers of Anthropic's dialogues. One GPU of
# 24-80 GB, bf16 autocast and torch.compile; torchrun spreads it over several.
# python data/hh_rlhf/prepare.py && python train_sft.py config/sft_hh_gpt2.py
out_dir = "out/sft_hh_gpt2"
init_from = "gpt2"
task = "hh_rlhf"  # no reward model at this stage: measured by the held-out loss (and the responses' length)
train_file = "data/hh_rlhf/sft_train.jsonl"  # ~160,000 dialogues; longer than the context: dropped and counted
val_file = "data/hh_rlhf/sft_val.jsonl"
eval_prompts = "data/hh_rlhf/prompts_eval.jsonl"
eval_max_prompts = 128
eval_samples = 0
template = "none"  # the prompts already end in "\n\nAssistant:"
batch_size = 32
max_iters = 5000  # 160,000 examples: one epoch
eval_interval = 500
log_interval = 20
max_new_tokens = 128
eval_batch_size = 32
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 100
dropout = 0.1
compile = True
device = "auto"
dtype = "auto"
