"""llama.cpp (llama-cpp-python) speed on the same GGUF, for benches/model_speed.rs.

Prints one JSON object per measurement: {"what": ..., "tokens": n, "seconds": [...]}.
Usage: python3 llama_cpp_speed.py MODEL.gguf THREADS REPEATS PREFILL_SIZES... --decode CONTEXT STEPS
"""
import json
import sys
import time

from llama_cpp import Llama


def main():
    args = sys.argv[1:]
    model_path, threads, repeats = args[0], int(args[1]), int(args[2])
    decode_at = None
    if "--decode" in args:
        i = args.index("--decode")
        decode_at = (int(args[i + 1]), int(args[i + 2]))
        args = args[:i]
    sizes = [int(s) for s in args[3:]]
    n_ctx = max(sizes + [decode_at[0] + decode_at[1] if decode_at else 0]) + 16
    llm = Llama(model_path=model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=512, n_ubatch=512, logits_all=False, verbose=False)
    # Token ids cycle through ordinary vocabulary entries (no specials).
    tokens = [(i * 7919) % 40000 + 100 for i in range(n_ctx)]
    for n in sizes:
        times = []
        for _ in range(repeats):
            llm.reset()
            t = time.perf_counter()
            llm.eval(tokens[:n])
            times.append(time.perf_counter() - t)
        print(json.dumps({"what": "prefill", "tokens": n, "seconds": times}), flush=True)
    if decode_at:
        ctx, steps = decode_at
        llm.reset()
        llm.eval(tokens[:ctx])
        times = []
        for s in range(steps):
            t = time.perf_counter()
            llm.eval([tokens[ctx + s]])
            times.append(time.perf_counter() - t)
        print(json.dumps({"what": "decode", "tokens": ctx, "seconds": times}), flush=True)


if __name__ == "__main__":
    main()
