# The pycode recipe at GPU scale, step 2: SFT of the GPT-2 of config/lm_gpt2.py on the standard library's functions.
# python data/pycode/prepare.py --tokenizer=gpt2 --max_body_lines=20 --max_tokens=1000   (data/pycode/gpt2)
# python train_lm.py config/lm_gpt2.py && python train_sft.py config/sft_gpt2.py
out_dir = "out/sft_gpt2"
init_from = "out/lm_gpt2"
train_file = "data/pycode/gpt2/sft_train.jsonl,data/pycode/gpt2/sft_train_renamed.jsonl"
val_file = "data/pycode/gpt2/sft_val.jsonl"
eval_prompts = "data/pycode/gpt2/prompts_eval.jsonl"
batch_size = 32
max_iters = 1500
eval_interval = 250
log_interval = 20
max_new_tokens = 256  # bodies of up to 20 lines
eval_batch_size = 32
eval_samples = 8
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 50
dropout = 0.1
compile = True
device = "auto"
dtype = "auto"
