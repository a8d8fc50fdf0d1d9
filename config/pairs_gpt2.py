# The pycode recipe at GPU scale, step 3a: the SFT model's own samples, ranked by the task's labeler.
# python collect_pairs.py config/pairs_gpt2.py      (after config/sft_gpt2.py)
out_dir = "out/pairs_gpt2"
init_from = "out/sft_gpt2"
train_file = "data/pycode/gpt2/sft_train.jsonl"
val_file = "data/pycode/gpt2/sft_val.jsonl"
samples_per_prompt = 4
max_pairs_per_prompt = 2
max_new_tokens = 256
temperature = 1.0
batch_size = 64
device = "auto"
dtype = "auto"
