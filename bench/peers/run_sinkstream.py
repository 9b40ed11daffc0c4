"""sinkstream on the peers' workload: the engine's decode step, one token at a time, as a user gets it
by default (``--weights auto``: int8 where sinkstream's kernels build; the fused step).

    python bench/peers/run_sinkstream.py --model out/peers/model --ids out/peers/ids.json --out out/peers/sinkstream.json
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import finish, load_ids, parser, stream

from sinkstream import Engine, __version__, load_model


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", required=True, help="the exported HF folder")
    ap.add_argument("--label", default="sinkstream")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--decode", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, weights=args.weights)
    ids = load_ids(args)
    engine = Engine(model, tok, n_sink=args.sink, window=args.window, decode=args.decode)
    with torch.no_grad():
        nll, ms = stream(lambda t: engine.step(t)[0], ids, args.label)
    finish(
        args,
        args.label,
        __version__,
        nll,
        ms,
        attn=model.config._attn_implementation,
        weights=getattr(model.config, "sinkstream_weights", "float32"),
        decode="fused" if engine.fused else "transformers",
    )


if __name__ == "__main__":
    main()
