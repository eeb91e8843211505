"""llama.cpp peer for benches/repeat_query.rs: time to first token for a question over a
long context, (a) re-prefilling context + question, (b) restoring llama.cpp's saved state
of the context from disk, then evaluating only the question.

Usage: python3 llama_cpp_repeat_query.py MODEL THREADS REPEATS CONTEXT_IDS_JSON QUESTION_IDS_JSON STATE_FILE [REPREFILL_REPEATS]
Prints JSON lines {"what": "reprefill"|"state_restore", "seconds": [...], "state_bytes": n}.

The context is held with n_ctx just large enough for context + question. The last
re-prefill evaluates the context, saves the state (untimed), then the question, so the
saved state costs no extra prefill; REPREFILL_REPEATS (default REPEATS) re-prefills.
"""
import json
import pickle
import sys
import time

import llama_cpp
from llama_cpp import Llama


def first_token(llm):
    # Greedy first token from the last position's logits (llama-cpp-python keeps only
    # the last row when logits_all is off).
    import numpy as np
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def main():
    model, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    context = json.load(open(sys.argv[4]))
    question = json.load(open(sys.argv[5]))
    state_file = sys.argv[6]
    reprefills = int(sys.argv[7]) if len(sys.argv) > 7 else repeats
    print(llama_cpp.llama_print_system_info().decode(), file=sys.stderr, flush=True)
    llm = Llama(model_path=model, n_ctx=len(context) + len(question) + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=512, n_ubatch=512, logits_all=False, verbose=False)
    times = []
    for r in range(max(reprefills, 1)):
        llm.reset()
        t = time.perf_counter()
        llm.eval(context)
        elapsed = time.perf_counter() - t
        if r == max(reprefills, 1) - 1:
            with open(state_file, "wb") as f:
                pickle.dump(llm.save_state(), f)
        t = time.perf_counter()
        llm.eval(question)
        first_token(llm)
        times.append(elapsed + time.perf_counter() - t)
    print(json.dumps({"what": "reprefill", "seconds": times}), flush=True)
    size = __import__("os").path.getsize(state_file)
    times = []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        with open(state_file, "rb") as f:
            llm.load_state(pickle.load(f))
        llm.eval(question)
        first_token(llm)
        times.append(time.perf_counter() - t)
    print(json.dumps({"what": "state_restore", "seconds": times, "state_bytes": size}), flush=True)


if __name__ == "__main__":
    main()
