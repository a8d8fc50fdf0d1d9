# The HH-RLHF recipe, step 3: PPO from the SFT model of step 1 against the reward model of step 2, measured by the win
# rate over the SFT model (the reward model's preference on held-out dialogues) and the KL to it.
# python train_ppo.py config/ppo_hh_gpt2.py      (after config/sft_hh_gpt2.py and config/rm_hh_gpt2.py)
out_dir = "out/ppo_hh_gpt2"
init_from = "out/sft_hh_gpt2"
reward_model = "out/rm_hh_gpt2"
reward = "model"
task = "hh_rlhf"
prompts_file = "data/hh_rlhf/prompts_train.jsonl"
eval_prompts = "data/hh_rlhf/prompts_eval.jsonl"
eval_max_prompts = 128
eval_samples = 2
max_iters = 300
eval_interval = 50
batch_size = 64
minibatch_size = 16
ppo_epochs = 4
max_new_tokens = 128
learning_rate = 1e-5
kl_coef = 0.05
adaptive_kl = True
target_kl = 6.0
score_norm = True  # standardised with the reward model's held-out mean and spread
missing_eot_penalty = -1.0
device = "auto"
dtype = "auto"  # PPO runs eagerly: generation's KV cache grows every step, which torch.compile would re-trace
