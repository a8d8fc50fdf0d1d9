# The IMDB recipe, step 3: PPO makes GPT-2 continue review openings positively, with trl's gpt2-sentiment settings:
# prompts of 2-8 words, continuations of up to 16 tokens, batch 128, 4 PPO epochs, learning rate 1.41e-5, adaptive KL
# from 0.2 towards 6 nats, vf_coef 0.1. trl reports the mean reward rising from about -0.5 to 1.7 (~2 h on a V100),
# with its DistilBERT classifier's logit as reward; ours is the reward model of step 2 (its log-odds).
# python train_ppo.py config/ppo_imdb_gpt2.py      (after config/lm_imdb_gpt2.py and config/rm_imdb_gpt2.py)
out_dir = "out/ppo_imdb_gpt2"
init_from = "out/lm_imdb_gpt2"  # the policy and the frozen reference: there is no SFT stage in this recipe
reward_model = "out/rm_imdb_gpt2"
reward = "model"
task = "imdb"  # held-out measures: the RM's mean score of sampled continuations, the share it calls positive
prompts_file = "data/imdb/prompts_train.jsonl"
eval_prompts = "data/imdb/prompts_eval.jsonl"  # 256 test-review openings
eval_samples = 4  # continuations of each held-out opening (and the KL to the reference, from them)
max_iters = 195  # 195 x 128 = one pass over the 25,000 train prompts
eval_interval = 25
log_interval = 1
batch_size = 128
minibatch_size = 32
ppo_epochs = 4
max_new_tokens = 16
temperature = 1.0  # plain sampling (trl: top_k 0, top_p 1)
learning_rate = 1.41e-5
kl_coef = 0.2
adaptive_kl = True
target_kl = 6.0
kl_horizon = 10000
gamma = 1.0
lam = 0.95
clip_range = 0.2
clip_range_value = 0.2
vf_coef = 0.1
score_norm = False  # the raw score, as trl rewards with the raw logit
score_clip = 0.0
missing_eot_penalty = 0.0  # continuations are cut at 16 tokens by design, not for rambling
critic = "shared"  # a value head on the policy, as trl's AutoModelForCausalLMWithValueHead
device = "auto"
dtype = "auto"  # PPO and GRPO run eagerly: generation's KV cache grows every step, which torch.compile would re-trace
