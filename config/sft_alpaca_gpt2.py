# Instruction tuning: GPT-2 (124M) fine-tuned on Stanford Alpaca's 52,002 instructions in the instruction template.
# Alpaca has no judge: the held-out loss is the measure; a few held-out instructions are completed to be read.
# python data/alpaca/prepare.py && python train_sft.py config/sft_alpaca_gpt2.py
# python sample.py --out_dir=out/sft_alpaca_gpt2 --chat=True
out_dir = "out/sft_alpaca_gpt2"
init_from = "gpt2"
task = "alpaca"
train_file = "data/alpaca/sft_train.jsonl"
val_file = "data/alpaca/sft_val.jsonl"  # 1 in 50: about 1,000 examples
eval_prompts = "data/alpaca/prompts_eval.jsonl"  # or 'none': the loss alone
eval_samples = 0
template = "instruction"  # "### Instruction:\n...\n\n### Response:\n", in every stage and in sample.py --chat
batch_size = 32
max_iters = 3000  # 96,000 examples: about two epochs
eval_interval = 500
log_interval = 20
max_new_tokens = 128
eval_batch_size = 32
learning_rate = 2e-5
min_lr = 2e-6
warmup_iters = 100
dropout = 0.1
compile = True
device = "auto"
dtype = "auto"
