"""attention_sinks 0.4.0 (PyPI) on the peers' workload. Runs in its own venv: it pins
transformers 4.34 and patches that version's attention forwards (eager attention only).

    out/peers/venv-attention-sinks/bin/python bench/peers/run_attention_sinks.py --model out/peers/model \
        --ids out/peers/ids.json --out out/peers/attention_sinks.json
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import finish, load_ids, parser, stream


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import attention_sinks
    import transformers
    from attention_sinks import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=torch.float32, attention_sink_size=args.sink, attention_sink_window_size=args.window
    ).eval()
    ids = load_ids(args)
    state = {"past": None}

    def step(t):
        out = model(input_ids=torch.tensor([[t]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1]

    with torch.no_grad():
        nll, ms = stream(step, ids, "attention_sinks")
    finish(args, "attention_sinks", attention_sinks.__version__, nll, ms, transformers=transformers.__version__)


if __name__ == "__main__":
    main()
