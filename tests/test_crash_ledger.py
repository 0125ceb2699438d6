"""What a crash of the embedded engine's process leaves behind: the line that says why, and
a budget per caller and request shape (the gateway's side is in test_engine_isolation.py)."""

from __future__ import annotations

import subprocess
import sys

from agentloop.backends.crash_ledger import CrashLedger, crash_cause
from agentloop.domain import CallContext, GenerationRequest, SamplingOptions

OPTIONS = SamplingOptions(temperature=0, top_p=1, top_k=40, max_tokens=4, repeat_penalty=1,
                          num_ctx=1024)


def request(prompt: str, tenant: str = "", session: str = "") -> GenerationRequest:
    return GenerationRequest(model="", options=OPTIONS, prompt=prompt,
                             context=CallContext(tenant=tenant, session=session))


def test_the_crash_line_names_ggml_s_assertion_not_a_stack_frame():
    # What a real GGML_ABORT prints (the message, then a backtrace), merged as the child's
    # stdout and stderr are.
    script = ("import ctypes, pathlib, llama_cpp\n"
              "lib = pathlib.Path(llama_cpp.__file__).parent / 'lib' / 'libggml-base.so'\n"
              "ctypes.CDLL(str(lib)).ggml_abort(b'ggml/src/ggml.c', 1234, "
              "b'GGML_ASSERT(%s) failed', b'n_tokens > 0')\n")
    died = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    lines = [line.rstrip() for line in died.stdout.splitlines() if line.strip()]

    assert died.returncode != 0 and len(lines) > 1, died.stdout
    assert crash_cause(lines) == "ggml/src/ggml.c:1234: GGML_ASSERT(n_tokens > 0) failed"


def test_a_shape_is_refused_after_its_budget_for_its_caller_only_and_until_the_window_ends():
    ledger = CrashLedger(budget=2, window=600.0)
    crasher, other = request("boom", tenant="a"), request("boom", tenant="b")
    ledger.blame([crasher, request("innocent", tenant="c")], now=0.0)
    assert ledger.refused_for(crasher, now=1.0) == 0  # one crash: within the budget
    ledger.blame([crasher], now=10.0)

    assert ledger.refused_for(crasher, now=11.0) == 589.0
    assert ledger.refused_for(request("boom!", tenant="a"), now=11.0) == 0  # another shape
    assert ledger.refused_for(other, now=11.0) == 0  # another caller
    assert ledger.refused_for(request("innocent", tenant="c"), now=11.0) == 0
    assert ledger.refused_for(crasher, now=601.0) == 0  # the first crash left the window
