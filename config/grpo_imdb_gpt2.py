# The IMDB recipe with critic-free RL: GRPO on the sentiment reward model, 8 continuations of each of 32 openings per
# iteration, each against its group's mean and spread; DeepSeekMath's k3 KL to the reference.
# python train_grpo.py config/grpo_imdb_gpt2.py      (after config/lm_imdb_gpt2.py and config/rm_imdb_gpt2.py)
out_dir = "out/grpo_imdb_gpt2"
init_from = "out/lm_imdb_gpt2"
reward_model = "out/rm_imdb_gpt2"
reward = "model"
task = "imdb"
prompts_file = "data/imdb/prompts_train.jsonl"
eval_prompts = "data/imdb/prompts_eval.jsonl"
eval_samples = 4
advantage = "grpo"
batch_size = 32
group_size = 8  # 256 continuations per iteration, twice PPO's 128
max_iters = 200
eval_interval = 25
max_new_tokens = 16
temperature = 1.0
score_norm = False
score_clip = 0.0
missing_eot_penalty = 0.0
kl = "k3"
kl_coef = 0.04
update_epochs = 2
minibatch_size = 64
learning_rate = 1.41e-5
device = "auto"
dtype = "auto"
