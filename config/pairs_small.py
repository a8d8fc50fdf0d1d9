# Comparisons of the small SFT model's own samples, ranked by the task's judge, for the reward model: about a minute.
# python collect_pairs.py config/pairs_small.py        (after train_sft.py config/sft_small.py)
out_dir = "out/pairs_small"
init_from = "out/sft_small"
samples_per_prompt = 4
max_pairs_per_prompt = 2
max_new_tokens = 64  # as every stage
temperature = 1.0
device = "cpu"
