"""llama.cpp's context shift (llama-cpp-python, built from source) on the peers' workload, on the
original GGUF file (Q4_1 weights, so its speed and memory are not fp32's).

llama.cpp keeps ``n_keep`` first tokens and, when the context is full, drops ``n_discard`` tokens
after them and shifts the rest back (a RoPE shift of the kept keys). ``--discard 1`` evicts one
token per step like a sink cache; llama.cpp's own default is half the context (``--discard 0``).

    out/peers/venv-llama-cpp/bin/python bench/peers/run_llama_cpp.py --gguf FILE --ids out/peers/ids.json \
        --out out/peers/llama_cpp.json
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import finish, load_ids, parser, stream


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--discard", type=int, default=1, help="tokens dropped per shift; 0: half the context")
    args = ap.parse_args()
    import llama_cpp
    from llama_cpp import Llama

    n_ctx, n_keep = args.sink + args.window, args.sink
    llm = Llama(
        model_path=args.gguf,
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    n_discard = args.discard or (n_ctx - n_keep) // 2
    mem, n_vocab = llama_cpp.llama_get_memory(llm._ctx.ctx), llm.n_vocab()
    ids = load_ids(args)
    shifts = [0]

    def step(t):
        if llm.n_tokens + 1 > n_ctx:  # context shift, as llama.cpp's main loop does it
            n = llm.n_tokens
            llama_cpp.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard)
            llama_cpp.llama_memory_seq_add(mem, 0, n_keep + n_discard, n, -n_discard)
            llm.input_ids[n_keep : n - n_discard] = llm.input_ids[n_keep + n_discard : n]
            llm.n_tokens = n - n_discard
            shifts[0] += 1
        llm.eval([t])
        return torch.from_numpy(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy())

    nll, ms = stream(step, ids, "llama.cpp")
    finish(
        args,
        f"llama.cpp context shift (discard {n_discard})",
        llama_cpp.__version__,
        nll,
        ms,
        weights="GGUF Q4_1 (original file)",
        context_shifts=shifts[0],
    )


if __name__ == "__main__":
    main()
