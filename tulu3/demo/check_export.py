"""``python -m tulu3.demo.check_export --ckpt C --hf H``: the HF export's logits vs tulu3's.

Builds the model of a tulu3 checkpoint in one process, loads the exported HF directory with
transformers, and compares the logits of the same tokens (max abs difference, fp32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def tulu3_logits(ckpt: str, tokens: torch.Tensor) -> torch.Tensor:
    from tulu3.checkpoint.load import checkpoint_shape, load_into_chunks
    from tulu3.config import load_config
    from tulu3.model.build import build_model_chunks
    from tulu3.model.presets import with_shape
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.init import init_distributed, init_model_parallel
    from tulu3.parallel.layout import make_layout

    init_distributed("gloo")
    shape = checkpoint_shape(ckpt)
    cfg = load_config(None, ["parallel.tp=1", "parallel.pp=1", "train.global_batch=1"])
    cfg.model = with_shape(cfg.model, shape)
    layout = make_layout(cfg, 1)
    init_model_parallel(layout, seed=0)
    groups = ProcessGroups.current()
    (model,) = build_model_chunks(cfg.model, layout, groups)
    load_into_chunks(ckpt, [model], shape, groups)
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[..., : shape.vocab].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result: dict = {"ckpt": args.ckpt, "hf": args.hf}
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        result["skipped"] = "transformers is not installed"
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    hf = LlamaForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32).eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 32))
    ours = tulu3_logits(args.ckpt, tokens)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    result.update(max_abs_diff=float((ours - ref).abs().max()),
                  logit_scale=float(ref.abs().max()), tokens=list(tokens.shape))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"[eval] export check: max |logits diff| = {result['max_abs_diff']:.2e}", flush=True)


if __name__ == "__main__":
    main()
