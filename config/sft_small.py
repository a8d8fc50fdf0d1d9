# Supervised fine-tuning of lm_small on the pycode demonstrations (def line + docstring -> body): about 3
# minutes on a 2-core laptop CPU (4.5 CPU-minutes on one core).
# python train_lm.py config/lm_small.py && python train_sft.py config/sft_small.py
out_dir = "out/sft_small"
init_from = "out/lm_small"
template = "none"  # the prompt (a def line and a docstring) already asks for a body
batch_size = 16
max_iters = 240  # 240 x 16 = 3,840 examples, about 3 epochs of the 1,343 demonstrations
eval_interval = 240  # before and after: loss on the val examples + 220 greedy completions, ~10 s each
log_interval = 20
eval_max_prompts = 0  # all 223 eval prompts that fit the context with 96 new tokens
max_new_tokens = 96  # the same limit (and so the same eval prompts) as train_ppo.py
# tried with 240 steps: lr 5e-4 (val 1.437, parses 71%), 1e-3 (1.460, 83%), 2e-3 (1.558, 55%); batch 8 x 480
# steps at 1e-3 (1.482, 78%) and 2e-3 (1.632, 75%); dropout 0.1 at 1e-3 (1.604, 35%): the pretrained model had
# no dropout, and switching it on costs more than it saves on this little data
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
dropout = 0.0
device = "cpu"
