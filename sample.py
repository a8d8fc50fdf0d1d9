"""
Sample from a trained model: any stage's out_dir, or GPT-2 weights.

    python sample.py --out_dir=out/lm_small --start="def "
    python sample.py --out_dir=out/sft_small --start=FILE:prompt.txt --greedy=True
    python sample.py --init_from=gpt2 --start="The meaning of life is" --top_p=0.9
    python sample.py --out_dir=out/sft_small --num_beams=4 --max_new_tokens=60
Every key: python sample.py --help
"""
from dataclasses import dataclass

import torch

from common import RunConfig, UserError, init_model, load_config, print_config, setup_runtime
from tokenizer import get_tokenizer


@dataclass
class Config(RunConfig):
    out_dir: str = "out/lm_small"  # the run to sample from (its ckpt.pt), unless init_from names GPT-2 weights
    init_from: str = "resume"  # 'resume' samples from out_dir; a GPT-2 name or Hugging Face directory loads those
    start: str = "\n"  # the prompt; FILE:path reads it from a file
    num_samples: int = 3  # samples to draw, one after another
    max_new_tokens: int = 200  # tokens to add at most (fewer if the context fills up or end-of-text comes)
    temperature: float = 0.8  # < 1 sharpens the distribution, > 1 flattens it
    top_k: int = 0  # sample from the k most likely tokens only; 0 keeps all
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this much probability
    greedy: bool = False  # always take the most likely token (deterministic)
    num_beams: int = 1  # beam search with this many beams (deterministic); 1 is off
    crop_prompt: bool = False  # keep only the end of a prompt longer than the context instead of stopping
    stop_at_eot: bool = True  # end a sample at the end-of-text token


def main(argv=None):
    cfg = load_config(Config, argv)
    rt = setup_runtime(cfg)
    print_config(cfg)
    torch.manual_seed(cfg.seed)
    source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    model, _, tokenizer_name = init_model(source, cfg.out_dir, {"dropout": 0.0}, None,
                                          stage_hint="train one first, e.g. `python train_lm.py config/lm_small.py`")
    model.eval().to(rt.device)
    tok = get_tokenizer(tokenizer_name)

    start = cfg.start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise UserError(f"cannot read the prompt file {start[5:]!r}: {e.strerror}") from None
    ids = tok.encode(start)
    if not ids:
        raise UserError("the prompt is empty; give --start some text")
    prompt = torch.tensor([ids], dtype=torch.long, device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    outputs = []
    for i in range(cfg.num_samples):
        try:
            with rt.autocast:
                out = model.generate(prompt, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                     top_p=cfg.top_p, greedy=cfg.greedy, num_beams=cfg.num_beams,
                                     eot_token=tok.eot_token if cfg.stop_at_eot else None,
                                     crop_prompt=cfg.crop_prompt, generator=generator)
        except ValueError as e:  # e.g. a prompt longer than the context
            raise UserError(str(e)) from None
        text = tok.decode(out[0].tolist())
        outputs.append(text)
        print(f"---------- sample {i + 1}/{cfg.num_samples}")
        print(text)
        if cfg.greedy or cfg.num_beams > 1:
            break  # deterministic: more samples would repeat this one
    return outputs


if __name__ == "__main__":
    main()
