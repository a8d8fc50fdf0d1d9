# Fine-tune OpenAI's GPT-2 (124M) on the Python standard library: for one GPU (or several with torchrun).
# python data/pycode/prepare.py --tokenizer=gpt2 --max_body_lines=20 --max_tokens=1000
# python train_lm.py config/lm_gpt2.py
# torchrun --standalone --nproc_per_node=8 train_lm.py config/lm_gpt2.py
out_dir = "out/lm_gpt2"
init_from = "gpt2"  # or gpt2-medium, gpt2-large, gpt2-xl, or a local Hugging Face directory
dataset = "pycode/gpt2"
block_size = 1024
dropout = 0.1
batch_size = 8
gradient_accumulation_steps = 8  # 8 x 8 x 1024 = 65k tokens per step (divided among the processes)
max_iters = 2000
eval_interval = 200
eval_iters = 40
log_interval = 10
learning_rate = 1e-4  # fine-tuning: a tenth of a pretraining rate, or the weights forget what they knew
min_lr = 1e-5
warmup_iters = 100
weight_decay = 0.1
compile = True
device = "auto"  # cuda
dtype = "auto"  # bfloat16 where supported, else float16 with a GradScaler
peak_tflops = 312.0  # A100 bf16; set your GPU's (H100: 989) for a meaningful MFU
