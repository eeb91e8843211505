"""llama.cpp (llama-cpp-python) speed on the same GGUF, for benches/model_speed.rs.

Prints one JSON object per measurement:
{"what": "prefill"|"decode", "tokens": n, "flash_attn": "off"|"on", "seconds": [...]}.
Usage: python3 llama_cpp_speed.py MODEL.gguf THREADS REPEATS PREFILL_SIZES...
           [--decode CONTEXT STEPS] [--flash-attn off,on]

Each flash-attention setting gets its own context (llama.cpp's own default on a CPU is
`auto`, which turns it on; llama-cpp-python's default is off), so the bench can report
both and compare with the faster. When CONTEXT is one of the prefill sizes, the decode
steps continue after the last prefill of that size (no second prefill of the context).
"""
import json
import sys
import time

import llama_cpp
from llama_cpp import Llama


def main():
    args = sys.argv[1:]
    flash = ["off"]
    if "--flash-attn" in args:
        i = args.index("--flash-attn")
        flash = args[i + 1].split(",")
        args = args[:i] + args[i + 2:]
    decode_at = None
    if "--decode" in args:
        i = args.index("--decode")
        decode_at = (int(args[i + 1]), int(args[i + 2]))
        args = args[:i] + args[i + 3:]
    model_path, threads, repeats = args[0], int(args[1]), int(args[2])
    sizes = [int(s) for s in args[3:]]
    n_ctx = max(sizes + [decode_at[0] + decode_at[1] if decode_at else 0]) + 16
    print(llama_cpp.llama_print_system_info().decode(), file=sys.stderr, flush=True)
    # Token ids cycle through ordinary vocabulary entries (no specials).
    tokens = [(i * 7919) % 40000 + 100 for i in range(n_ctx)]
    for fa in flash:
        llm = Llama(model_path=model_path, n_ctx=n_ctx, n_threads=threads,
                    n_threads_batch=threads, n_batch=512, n_ubatch=512, logits_all=False,
                    flash_attn=(fa == "on"), verbose=False)
        continued = False
        for n in sizes:
            times = []
            for _ in range(repeats):
                llm.reset()
                t = time.perf_counter()
                llm.eval(tokens[:n])
                times.append(time.perf_counter() - t)
            print(json.dumps({"what": "prefill", "tokens": n, "flash_attn": fa,
                              "seconds": times}), flush=True)
            if decode_at and n == decode_at[0] and n == sizes[-1]:
                continued = True
        if decode_at:
            ctx, steps = decode_at
            if not continued:
                llm.reset()
                llm.eval(tokens[:ctx])
            times = []
            for s in range(steps):
                t = time.perf_counter()
                llm.eval([tokens[ctx + s]])
                times.append(time.perf_counter() - t)
            print(json.dumps({"what": "decode", "tokens": ctx, "flash_attn": fa,
                              "seconds": times}), flush=True)
        del llm


if __name__ == "__main__":
    main()
