# Comparisons of the small SFT model's own samples, ranked by the parser, for the reward model: about 2 minutes.
# python collect_pairs.py config/pairs_small.py        (after train_sft.py config/sft_small.py)
out_dir = "out/pairs_small"
init_from = "out/sft_small"
samples_per_prompt = 3
max_pairs_per_prompt = 2
max_new_tokens = 96  # as config/ppo_small.py
temperature = 1.0
device = "cpu"
