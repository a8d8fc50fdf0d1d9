# The IMDB recipe, step 2: a sentiment classifier as the reward (trl uses lvwerra/distilbert-imdb): the GPT-2 of step 1
# with a scalar head, trained on the 25,000 labelled train reviews to give the log-odds that a review is positive.
# python train_rm.py config/rm_imdb_gpt2.py      (after config/lm_imdb_gpt2.py)
out_dir = "out/rm_imdb_gpt2"
init_from = "out/lm_imdb_gpt2"
loss = "logistic"  # -log sigma(r) for a positive review, -log sigma(-r) for a negative one: r > 0 says positive
train_file = "data/imdb/rm_train.jsonl"
val_file = "data/imdb/rm_val.jsonl"  # 2,000 test reviews, half positive: accuracy and loss
batch_size = 16  # reviews per step, padded to the longest of the batch (batches group similar lengths)
eval_batch_size = 32
max_iters = 1560  # one epoch of the 25,000 reviews
eval_interval = 250
log_interval = 20
learning_rate = 2e-5  # the backbone; the fresh head learns head_lr_mult times faster
head_lr_mult = 50.0
min_lr = 2e-6
warmup_iters = 50
dropout = 0.1
compile = True
device = "auto"
dtype = "auto"
