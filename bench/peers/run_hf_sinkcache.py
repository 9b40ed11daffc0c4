"""transformers' old SinkCache (4.36-4.52, removed in 5.0) on the peers' workload, in its own venv.
Positions are the model's own: ``cache_position`` from ``get_seq_length()``, as ``generate`` does.

    out/peers/venv-hf-sinkcache/bin/python bench/peers/run_hf_sinkcache.py --model out/peers/model \
        --ids out/peers/ids.json --out out/peers/hf_sinkcache.json
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import finish, load_ids, parser, stream


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, SinkCache

    model = AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=torch.float32, attn_implementation=args.attn
    ).eval()
    cache = SinkCache(window_length=args.sink + args.window, num_sink_tokens=args.sink)
    ids = load_ids(args)

    def step(t):
        return model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1]

    with torch.no_grad():
        nll, ms = stream(step, ids, "hf SinkCache")
    finish(args, "transformers SinkCache", transformers.__version__, nll, ms, attn=args.attn)


if __name__ == "__main__":
    main()
