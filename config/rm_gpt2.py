# The pycode recipe at GPU scale, step 3: the reward model from the made-up pairs and the ranked samples.
# python train_rm.py config/rm_gpt2.py      (after config/sft_gpt2.py and config/pairs_gpt2.py)
out_dir = "out/rm_gpt2"
init_from = "out/sft_gpt2"
train_file = "data/pycode/gpt2/pref_train.jsonl,out/pairs_gpt2/pref_train.jsonl"
val_file = "data/pycode/gpt2/pref_val.jsonl,out/pairs_gpt2/pref_val.jsonl"
batch_size = 32
eval_batch_size = 64
max_iters = 1000
eval_interval = 250
log_interval = 20
learning_rate = 1e-5
head_lr_mult = 50.0
min_lr = 1e-6
warmup_iters = 50
compile = True
device = "auto"
dtype = "auto"
